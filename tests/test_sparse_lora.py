"""Sparsity-preserving LoRA over a pruned base (peftkit.keep_sparsity, issue 17): ΔW = (s B A) ⊙ M in the
forward (training and no-grad) and in merges, so a merge is exact and keeps every pruned zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.lora import Linear as LoraLinear

from .models import tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def prune_randomly(model: nn.Module, names: list[str], sparsity: float = 0.5, seed: int = 0) -> dict:
    """Zero a random half of each named module's weight; the masks (True = kept), keyed as in the model."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight
        mask = torch.rand(w.shape, generator=g) >= sparsity
        with torch.no_grad():
            w.mul_(mask)
        masks[name] = mask
    return masks


def lora_names(model: nn.Module, suffixes=TARGETS) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


def masked_model(config_kwargs=None):
    base = tiny_llama()
    masks = prune_randomly(base, lora_names(base))
    torch.manual_seed(1)
    pm = peftkit.get_peft_model(base, peftkit.LoraConfig(target_modules=TARGETS, r=4, init_lora_weights=False,
                                                         **(config_kwargs or {})))
    return pm, masks


IDS = torch.tensor([[3, 9, 17, 2, 40, 11, 5, 8]])


def reference_logits(pm, masks) -> torch.Tensor:
    """The masked model computed directly: a copy of the base with W + (s B A) ⊙ M written into it."""
    import copy

    base = copy.deepcopy(pm.get_base_model())
    ref = {}
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLinear):
            name = name
            W = layer.get_base_layer().weight
            delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
            ref[name] = (W + delta * masks[name]).detach()
    plain = tiny_llama()
    with torch.no_grad():
        for name, w in ref.items():
            plain.get_submodule(name).weight.copy_(w)
        for name, m in plain.named_modules():  # the pruned base weights, for the layers LoRA does not cover
            if name in masks and name not in ref:
                m.weight.mul_(masks[name])
        return plain(IDS).logits


def test_masked_forward_matches_the_direct_computation_with_and_without_grad():
    pm, masks = masked_model()
    assert sorted(peftkit.keep_sparsity(pm, masks)) == sorted(f"base_model.model.{n}" for n in masks)
    expected = reference_logits(pm, masks)
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, expected)  # the no-grad road steps aside
    torch.testing.assert_close(pm(IDS).logits, expected)  # the autograd path


def test_masked_training_then_merge_is_exact_and_keeps_every_zero():
    pm, masks = masked_model()
    peftkit.keep_sparsity(pm, masks)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = pm(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.eval()
    with torch.no_grad():
        before = pm(IDS).logits
        merged = pm.merge_and_unload()
        after = merged(IDS).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for name, mask in masks.items():
        w = merged.get_submodule(name).weight
        assert torch.count_nonzero(w[~mask]) == 0, name  # every pruned zero survives the merge


def test_merge_unmerge_round_trip_and_plain_merge_loses_zeros():
    pm, masks = masked_model()
    peftkit.keep_sparsity(pm, masks)
    weights = {n: pm.get_base_model().get_submodule(n).get_base_layer().weight.clone() for n in masks}
    pm.merge_adapter()
    for n, mask in masks.items():
        assert torch.count_nonzero(pm.get_base_model().get_submodule(n).get_base_layer().weight[~mask]) == 0
    pm.unmerge_adapter()
    for n, w in weights.items():
        torch.testing.assert_close(pm.get_base_model().get_submodule(n).get_base_layer().weight, w)
    peftkit.keep_sparsity(pm, None)  # a plain (dense) merge: the adapter fills the zeros
    merged = pm.merge_and_unload()
    lost = sum(int(torch.count_nonzero(merged.get_submodule(n).weight[~m])) for n, m in masks.items())
    assert lost > 0.9 * sum(int((~m).sum()) for m in masks.values())


def test_conv1d_fan_in_fan_out_layout():
    base = tiny_gpt2()
    names = [n for n, _ in base.named_modules() if n.endswith(("attn.c_attn", "mlp.c_fc"))]
    masks = prune_randomly(base, names)
    torch.manual_seed(1)
    pm = peftkit.get_peft_model(base, peftkit.LoraConfig(target_modules=["c_attn", "c_fc"], r=4,
                                                         init_lora_weights=False, fan_in_fan_out=True))
    peftkit.keep_sparsity(pm, masks)
    with torch.no_grad():
        before = pm(IDS).logits
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, before, rtol=1e-5, atol=1e-5)
    for name, mask in masks.items():
        assert torch.count_nonzero(merged.get_submodule(name).weight[~mask]) == 0


def test_bad_masks_are_refused_and_nothing_is_set():
    pm, masks = masked_model()
    wrong = dict(masks)
    last = sorted(wrong)[-1]
    wrong[last] = wrong[last][:, :-1]
    with pytest.raises(peftkit.ConfigError, match="not this model's"):
        peftkit.keep_sparsity(pm, wrong)
    assert not any("delta_mask" in m._buffers for m in pm.modules())
    dora, dmasks = masked_model({"use_dora": True})
    with pytest.raises(peftkit.ConfigError, match="DoRA"):
        peftkit.keep_sparsity(dora, dmasks)
    peftkit.keep_sparsity(pm, masks)
    with pytest.raises(peftkit.PeftkitError, match="mixed-adapter"):
        with torch.no_grad():
            pm(IDS, adapter_names=["default"])
    assert peftkit.keep_sparsity(pm, None) == []
    assert not any("delta_mask" in m._buffers for m in pm.modules())


def test_the_mask_is_not_saved_with_the_adapter(tmp_path):
    pm, masks = masked_model()
    peftkit.keep_sparsity(pm, masks)
    pm.save_pretrained(str(tmp_path))
    saved = peftkit.load_peft_weights(str(tmp_path))
    assert not any("mask" in k for k in saved) and all("lora_" in k for k in saved)
