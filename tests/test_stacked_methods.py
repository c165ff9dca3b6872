"""Adapters of different methods on the same module: LoRA, IA3 and bottleneck layers stack (the newer
layer wraps the older one), so a model serves default-configured adapters of all three at once.

Each adapter must behave as it does alone: the same outputs in a mixed batch, the same file (Hugging
Face PEFT loads it), merges in the order of the composition, and deleting every adapter gives back
the plain model bit for bit."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import BottleneckConfig, IA3Config, LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.core.layer import AdapterLayer
from peftkit.errors import MergeError, TargetError

from .models import randomize_adapters

CONFIGS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM"),  # its Llama default: k_proj, v_proj, down_proj (feedforward)
    "bn": lambda: BottleneckConfig(task_type="CAUSAL_LM", style="pfeiffer", reduction_factor=8),  # on down_proj
}
IDS = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(0))


def fresh():
    return peftkit.load_model()[0].eval()


def stacked(order):
    torch.manual_seed(0)  # the adapters' initial values (then perturbed by randomize_adapters)
    pm = get_peft_model(fresh(), CONFIGS[order[0]](), adapter_name=order[0])
    for name in order[1:]:
        pm.add_adapter(name, CONFIGS[name]())
    randomize_adapters(pm, seed=1, std=0.2)
    return pm.eval()


@pytest.mark.parametrize("order", [["lora", "ia3", "bn"], ["bn", "ia3", "lora"]])
def test_stacked_adapters_each_behave_as_alone(order, tmp_path):
    import peft

    pm = stacked(order)
    down = pm.get_base_model().model.layers[0].mlp.down_proj
    assert type(down.base_layer.base_layer).__module__.endswith(f"{'lora.linear' if order[0] == 'lora' else 'layer'}")
    pm.save_pretrained(tmp_path)
    names = ["lora", "ia3", "bn"]
    with torch.no_grad():
        mixed = pm(input_ids=IDS, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = PeftModel.from_pretrained(fresh(), tmp_path / name).eval()
            ref = alone(input_ids=IDS).logits
            pm.set_adapter(name)
            torch.testing.assert_close(pm(input_ids=IDS).logits, ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(mixed[i], ref[i], atol=1e-4, rtol=1e-4)
            if name != "bn":  # Hugging Face PEFT has no bottleneck adapters
                hf = peft.PeftModel.from_pretrained(fresh(), tmp_path / name).eval()
                torch.testing.assert_close(hf(input_ids=IDS).logits, ref, atol=1e-4, rtol=1e-4)
        base = fresh()(input_ids=IDS).logits
        assert not torch.allclose(mixed[0], base[0])
        for name in order:
            pm.delete_adapter(name)
        assert not any(isinstance(m, AdapterLayer) for m in pm.get_base_model().modules())
        assert torch.equal(pm.get_base_model()(input_ids=IDS).logits, base)


def test_merges_follow_the_composition():
    pm = stacked(["lora", "ia3"])  # IA3 wraps LoRA on v_proj and down_proj: y = l ⊙ (W x + s B A x)
    with torch.no_grad():
        pm.set_adapter(["lora", "ia3"])
        both = pm(input_ids=IDS).logits
        before = {k: v.clone() for k, v in pm.state_dict().items()}
        with pytest.raises(MergeError, match="merge those first"):
            pm.merge_adapter(["ia3"])  # IA3 alone would scale LoRA's rows too
        assert all(torch.equal(before[k], v) for k, v in pm.state_dict().items())  # nothing changed
        pm.merge_adapter(["lora"])  # the inner one alone is fine
        pm.unmerge_adapter()
        merged = pm.merge_and_unload(adapter_names=["lora", "ia3"])  # together: inner first
        # logits of about 15: float32 merges differ from the unmerged sums by about 1e-4
        torch.testing.assert_close(merged(input_ids=IDS).logits, both, atol=1e-3, rtol=1e-4)


def test_only_lora_ia3_and_bottleneck_layers_stack():
    pm = stacked(["lora"])
    with pytest.raises(TargetError, match="only LoRA, IA3 and bottleneck layers stack"):
        pm.add_adapter("ln", LNTuningConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert list(pm.peft_config) == ["lora"]
