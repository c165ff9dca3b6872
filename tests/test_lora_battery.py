"""The LoRA property battery over every model kind (see tests/models.py)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.inject import AdapterLayer

from .models import CASES, randomize_adapters

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "dora": {"use_dora": True},
}


def make(case, variant="lora", r=4, **kw):
    base = case.build()
    cfg = LoraConfig(r=r, target_modules=case.targets, task_type=case.task_type, **{**VARIANTS[variant], **kw})
    return base, cfg


def close(a, b, tol=1e-4):
    """Equal up to fp32 rounding, relative to the output's scale (merging reorders the sums)."""
    return torch.allclose(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=0)


def out(case, model, batch=3, **extra):
    with torch.no_grad():
        return case.output(model(**case.inputs(batch), **extra))


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


def test_default_init_is_noop(case):
    base, cfg = make(case)
    ref = out(case, base)
    pm = get_peft_model(base, cfg)
    assert torch.allclose(out(case, pm), ref, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_adapter_parameters_train(case, variant):
    base, cfg = make(case, variant)
    pm = get_peft_model(base, cfg)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "modules_to_save" in n) for n in trainable)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for _ in range(3):
        y = case.output(pm(**case.inputs(4)))
        loss = (y.float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        opt.step()
    for n, p in pm.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    changed = [n for n in trainable if not torch.equal(pm.get_parameter(n), before[n])]
    assert any("lora_B" in n or "lora_embedding" in n for n in changed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_unmerge_and_unload(case, variant):
    base, cfg = make(case, variant)
    base_out = out(case, base)
    pm = get_peft_model(base, cfg)
    # moderate weights: strong random adapters on every layer amplify fp32 rounding chaotically
    randomize_adapters(pm, std=0.03)
    ref = out(case, pm)
    assert not torch.allclose(ref, base_out, atol=1e-4), "adapter must change the output"
    pm.merge_adapter()
    assert close(out(case, pm), ref)
    pm.merge_adapter()  # idempotent
    assert close(out(case, pm), ref)
    pm.unmerge_adapter()
    assert close(out(case, pm), ref)
    with pm.disable_adapter():  # after a merge/unmerge round trip: float rounding of W + dW - dW
        assert close(out(case, pm), base_out, tol=1e-4)
    assert close(out(case, pm), ref)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    kwargs = case.inputs(3)
    with torch.no_grad():
        assert close(case.output(merged(**kwargs)), ref)


def test_disable_adapter_equals_base_and_restores(case):
    base, cfg = make(case)
    base_out = out(case, base)
    pm = get_peft_model(base, cfg)
    randomize_adapters(pm)
    ref = out(case, pm)
    with pm.disable_adapter():
        assert torch.allclose(out(case, pm), base_out, atol=1e-6)
    assert torch.allclose(out(case, pm), ref, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip_exact(case, variant, tmp_path):
    base, cfg = make(case, variant)
    fresh, fresh_again = copy.deepcopy(base), copy.deepcopy(base)
    pm = get_peft_model(base, cfg)
    randomize_adapters(pm)
    ref = out(case, pm)
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(out(case, loaded), ref)
    sd1 = {k: v for k, v in pm.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    sd2 = {k: v for k, v in loaded.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable = PeftModel.from_pretrained(fresh_again, tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_several_adapters_coexist_and_delete_leaves_no_trace(case):
    base, cfg = make(case)
    base_out = out(case, base)
    pm = get_peft_model(base, cfg)
    randomize_adapters(pm, seed=1)
    out_a = out(case, pm)
    pm.add_adapter("other", cfg.replace(r=2))
    assert pm.active_adapter == "default"
    assert torch.allclose(out(case, pm), out_a, atol=1e-6)
    randomize_adapters(pm, seed=2)  # changes both; recompute a
    out_a = out(case, pm)
    pm.set_adapter("other")
    out_b = out(case, pm)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n]
    assert trainable and all(".other" in n for n in trainable)
    pm.set_adapter("default")
    assert torch.allclose(out(case, pm), out_a, atol=1e-6)
    pm.delete_adapter("other")
    assert list(pm.peft_config) == ["default"]
    assert not any("other" in k for k in pm.state_dict())
    for _, m in pm.named_modules():
        if isinstance(m, AdapterLayer):
            assert "other" not in m.adapter_names
    assert torch.allclose(out(case, pm), out_a, atol=1e-6)
    pm.delete_adapter("default")
    assert not any(isinstance(m, AdapterLayer) for m in pm.modules())
    assert torch.allclose(out(case, pm), base_out, atol=1e-6)


def test_mixed_batch_rows_equal_single_adapter_runs(case):
    base, cfg = make(case)
    pm = get_peft_model(base, cfg)
    pm.add_adapter("b", cfg.replace(r=6))  # a different rank
    randomize_adapters(pm, seed=3)
    names = ["default", "__base__", "b", "b", "default", "__base__"]
    batch = len(names)
    with torch.no_grad():
        singles = {}
        for name in ("default", "b"):
            pm.set_adapter(name)
            singles[name] = case.output(pm(**case.inputs(batch)))
        with pm.disable_adapter():
            singles["__base__"] = case.output(pm(**case.inputs(batch)))
        mixed = case.output(pm(**case.inputs(batch), adapter_names=names))
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], singles[name][row], atol=1e-4), (row, name)


def test_mixed_batch_generate(case):
    if not case.lm:
        pytest.skip("no generate()")
    base, cfg = make(case)
    pm = get_peft_model(base, cfg)
    pm.add_adapter("b", cfg.replace(r=2))
    randomize_adapters(pm, seed=4, std=0.5)
    names = ["default", "b", "__base__"]
    inputs = case.inputs(3)
    kw = dict(max_new_tokens=5, do_sample=False)
    mixed = pm.generate(**inputs, adapter_names=names, **kw)
    for row, name in enumerate(names):
        one = {k: v[row: row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with pm.disable_adapter():
                single = pm.generate(**one, **kw)
        else:
            pm.set_adapter(name)
            single = pm.generate(**one, **kw)
        n = single.shape[1]  # a row that stopped early (EOS) is padded in the batch
        assert torch.equal(mixed[row, :n], single[0]), (row, name)
        if n < mixed.shape[1]:
            eos = pm.generation_config.eos_token_id
            assert single[0, -1].item() in (eos if isinstance(eos, list) else [eos])
