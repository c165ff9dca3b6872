"""Every bad input raises a PeftkitError that says what is wrong, before the model changes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftkit import (
    AdapterNameError,
    CheckpointError,
    ConfigError,
    LoraConfig,
    MergeError,
    PeftConfig,
    PeftkitError,
    PeftModel,
    TargetError,
    get_peft_model,
)
from peftkit._io import atomic_write_bytes
from peftkit.inject import AdapterLayer

from .models import MLP, randomize_adapters, tiny_llama


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before), set(after) ^ set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_peftkit_error_is_value_error():
    assert issubclass(PeftkitError, ValueError)
    for cls in (ConfigError, TargetError, AdapterNameError, CheckpointError, MergeError):
        assert issubclass(cls, PeftkitError)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be an integer > 0"),
    ({"r": -3}, "r must be an integer > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
    ({"r": "8"}, "r must be of type int"),
    ({"r": 2.5}, "r must be of type int"),
    ({"target_modules": 5}, "target_modules must be of type"),
    ({"bias": "some"}, "bias must be of type"),
    ({"use_dora": "yes"}, "use_dora must be of type bool"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' is not supported"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"task_type": "CAUSAL"}, "Invalid task type"),
    ({"use_dora": True, "lora_bias": True}, "use_dora=True cannot be combined"),
    ({"loftq_config": {"loftq_bits": 4}}, "not supported"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_config_of_another_method_or_without_type(tmp_path):
    with pytest.raises(ConfigError, match="is a IA3 adapter config"):
        LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["k"]})
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        PeftConfig.from_dict({"r": 8})
    with pytest.raises(ConfigError, match="Unknown peft_type"):
        PeftConfig.from_dict({"peft_type": "NOT_A_METHOD"})
    with pytest.raises(ConfigError, match="r must be of type int"):
        PeftConfig.from_dict({"peft_type": "LORA", "r": "eight"})


def test_no_module_matched_lists_close_names():
    model = tiny_llama()
    before = state(model)
    with pytest.raises(TargetError, match=r"Target modules .* not found in the base model: no module of the model matched.*q_proj") as info:
        get_peft_model(model, LoraConfig(target_modules=["q_prj"]))
    assert "Closest module names" in str(info.value)
    assert_unchanged(model, before)
    with pytest.raises(TargetError, match="layers_to_transform"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert_unchanged(model, before)


def test_unsupported_target_type_leaves_model_unchanged():
    model = tiny_llama()
    before = state(model)
    with pytest.raises(TargetError, match="not supported by LoRA"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "mlp"]))  # mlp is a LlamaMLP
    assert_unchanged(model, before)


def test_adapter_name_errors():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    keys = set(pm.state_dict())
    with pytest.raises(AdapterNameError, match="already exists"):
        pm.add_adapter("default", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match="not valid"):
        pm.add_adapter("a.b", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match="Unknown adapter 'nope'"):
        pm.set_adapter("nope")
    with pytest.raises(AdapterNameError, match="Unknown adapter 'nope'"):
        pm.delete_adapter("nope")
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(AdapterNameError, match=r"Unknown adapter name\(s\) \['nope'\]"):
        pm(ids, adapter_names=["default", "nope"])
    with pytest.raises(PeftkitError, match="give one name per row"):
        pm(ids, adapter_names=["default", "default", "default"])
    with pytest.raises(TargetError):
        pm.add_adapter("x", LoraConfig(r=2, target_modules=["nothing_here"]))
    assert set(pm.state_dict()) == keys and list(pm.peft_config) == ["default"]


def test_mixed_batch_with_merged_adapter_raises():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.merge_adapter()
    with pytest.raises(MergeError, match="unmerge first"):
        pm(torch.ones(1, 3, dtype=torch.long), adapter_names=["default"])


def test_safe_merge_with_nan_raises_and_changes_nothing():
    pm = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"]))
    with torch.no_grad():
        pm.base_model.model.lin0.lora_B["default"].weight.fill_(float("nan"))
    w = pm.base_model.model.lin0.base_layer.weight.clone()
    with pytest.raises(MergeError, match="NaN"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(pm.base_model.model.lin0.base_layer.weight, w)
    assert not pm.base_model.model.lin0.merged


def _saved(tmp_path, r=4):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm)
    pm.save_pretrained(tmp_path)
    return pm


def test_shape_mismatch_names_key_and_leaves_model_unchanged(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 2  # the file's tensors are rank 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    before = state(model)
    with pytest.raises(CheckpointError, match=r"lora_A.weight' has shape \(4, 16\) but the model expects \(2, 16\)"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_adapter_for_another_model_is_refused(tmp_path):
    from .models import tiny_gpt2

    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_gpt2()
    before = state(model)
    with pytest.raises(CheckpointError, match="different model"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_load_adapter_failure_leaves_no_trace(tmp_path):
    _saved(tmp_path, r=4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    keys = set(pm.state_dict())
    with pytest.raises(CheckpointError):
        pm.load_adapter(tmp_path, "other")
    assert set(pm.state_dict()) == keys and list(pm.peft_config) == ["default"]


def test_missing_truncated_and_corrupt_files(tmp_path):
    model = tiny_llama()
    before = state(model)
    with pytest.raises(CheckpointError, match="No folder"):
        PeftModel.from_pretrained(model, str(tmp_path / "does" / "not" / "exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        PeftModel.from_pretrained(model, empty)
    good = tmp_path / "good"
    _saved(good)
    weights = good / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(CheckpointError, match="has neither adapter_model.safetensors"):
        PeftModel.from_pretrained(model, good)
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PeftModel.from_pretrained(model, good)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PeftModel.from_pretrained(model, good)
    weights.write_bytes(data)
    (good / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PeftModel.from_pretrained(model, good)
    (good / "adapter_config.json").write_text('["not", "an", "object"]')
    with pytest.raises(ConfigError, match="expected a JSON object"):
        PeftModel.from_pretrained(model, good)
    assert_unchanged(model, before)


def test_missing_tensor_in_file(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(sd)[0]
    del sd[dropped]
    save_file(sd, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    before = state(model)
    with pytest.raises(CheckpointError, match=f"has no tensor '{dropped}'"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind


def test_save_into_a_file_path_is_refused(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PeftkitError, match="is a file"):
        pm.save_pretrained(f)


def test_type_errors_name_the_expected_type_readably():
    from peftkit import LoraConfig

    with pytest.raises(ConfigError, match=r"alpha_pattern must be of type dict\[str, int or float\] or None"):
        LoraConfig(alpha_pattern={"q": "x"})
    # (the order of a Union's members is typing's: a cached equal Union may list them the other way)
    with pytest.raises(ConfigError, match=r"target_modules must be of type (list\[str\] or str|str or list\[str\]) or None, got int"):
        LoraConfig(target_modules=3)


def test_svd_rank_beyond_the_weights_rank_is_refused_and_adds_nothing():
    from peftkit import LoraConfig, PeftkitError, get_peft_model

    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"]))
    with pytest.raises(PeftkitError, match="svd_rank=1000 is larger than the rank"):
        pm.add_weighted_adapter(["default"], [1.0], "combined", svd_rank=1000)
    assert list(pm.peft_config) == ["default"]
    pm.add_weighted_adapter(["default"], [1.0], "combined", svd_rank=10)  # lin0 is 10 -> 20: rank 10 at most
    assert "combined" in pm.peft_config
