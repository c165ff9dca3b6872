"""examples/lightning_lora.py: LoRA injected into a plain nn.Module (no PeftModel), trained by
lightning.Trainer on scikit-learn's digits, saved as a PEFT folder that peftkit and Hugging Face PEFT
load, and as an adapter-only Lightning checkpoint. The example's ``run`` is called in-process."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

import peftkit  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "lightning_lora.py")
pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec")]


def _load_example():
    spec = importlib.util.spec_from_file_location("lightning_lora_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def result(example, tmp_path_factory):
    return example.run(str(tmp_path_factory.mktemp("lightning_lora")), seed=0)


def _logits(model, result):
    with torch.no_grad():
        return model.eval()(result["data"]["new_test"][0])


def test_accuracy_goes_from_chance_to_a_working_classifier(result):
    f = result["figures"]
    assert f["old_pretrained"] > 0.9  # the base learnt 0-4
    assert f["new_before"] < 0.35  # on 5-9 it is at chance (0.2) before the adapter
    assert f["new_after"] > 0.8
    assert f["old_adapter_disabled"] == f["old_pretrained"]  # adapters off: the untouched base again
    assert 0 < f["trainable"] < f["total"] / 5


def test_only_adapter_tensors_train(result):
    module = result["module"]
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.lora_A.default.weight", "fc1.lora_B.default.weight", "fc2.lora_A.default.weight",
                         "fc2.lora_B.default.weight", "head.modules_to_save.default.weight",
                         "head.modules_to_save.default.bias"}
    assert sum(module.get_parameter(name).numel() for name in trainable) == result["figures"]["trainable"]


def test_base_weights_are_bit_identical_after_the_lora_run(result):
    after = peftkit.get_base_model_state_dict(result["module"])
    pretrained = result["pretrained"].state_dict()
    assert set(after) == set(result["base_before"]) == set(pretrained)
    for key, tensor in after.items():
        assert torch.equal(tensor, result["base_before"][key]), key
        assert torch.equal(tensor, pretrained[key]), key


def test_lora_tensors_changed(result):
    after = peftkit.get_peft_model_state_dict(result["module"])
    before = result["adapter_before"]
    assert set(after) == set(before) == {"fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight",
                                         "fc2.lora_B.weight", "head.weight", "head.bias"}
    for key in before:
        assert not torch.equal(after[key], before[key]), key
    assert not torch.equal(after["head.weight"], result["pretrained"].head.weight)  # the copy trained, not the base


def test_adapter_folder_loads_in_peftkit(result):
    fresh = copy.deepcopy(result["pretrained"])
    loaded = peftkit.PeftModel.from_pretrained(fresh, result["adapter_folder"])
    torch.testing.assert_close(_logits(loaded, result), _logits(result["module"], result))
    assert not torch.equal(_logits(result["pretrained"], result), _logits(loaded, result))  # the adapter acts


def test_adapter_folder_loads_in_hugging_face_peft(result):
    peft = pytest.importorskip("peft")
    fresh = copy.deepcopy(result["pretrained"])
    loaded = peft.PeftModel.from_pretrained(fresh, result["adapter_folder"])
    torch.testing.assert_close(_logits(loaded, result), _logits(result["module"], result))


def test_adapter_only_checkpoint_holds_the_adapter_and_restores_it(result):
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    trainable = {"net." + name for name, p in result["module"].named_parameters() if p.requires_grad}
    assert set(state) == trainable  # no base tensor in it
    restored = result["restored"]
    assert restored is not result["module"]
    torch.testing.assert_close(_logits(restored, result), _logits(result["module"], result))
    assert result["figures"]["new_restored"] == result["figures"]["new_after"]


def test_restoring_refuses_a_checkpoint_of_another_adapter(example, result, tmp_path):
    config = peftkit.LoraConfig(r=8, target_modules=["fc1", "fc2"], modules_to_save=["head"])  # other shapes
    with pytest.raises(RuntimeError, match="size mismatch"):
        example.restore_from_checkpoint(result["pretrained"], config, result["checkpoint"])
    config = peftkit.LoraConfig(r=4, target_modules=["fc1"], modules_to_save=["head"])  # fc2 not targeted
    with pytest.raises(RuntimeError, match="does not fit the adapter"):
        example.restore_from_checkpoint(result["pretrained"], config, result["checkpoint"])


def test_run_is_deterministic(example, result, tmp_path):
    again = example.run(str(tmp_path), seed=0)
    assert again["figures"] == result["figures"]
    first, second = (peftkit.get_peft_model_state_dict(r["module"]) for r in (result, again))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_main_prints_the_figures(example, capsys):
    example.main()
    lines = capsys.readouterr().out.splitlines()
    after = next(line for line in lines if line.startswith("after LoRA on digits 5-9"))
    assert float(after.rsplit(" ", 1)[1]) > 0.8
    assert any(line.startswith("trainable: ") for line in lines)
    assert lines[-1].startswith("done in ")
