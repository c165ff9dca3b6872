"""The core property battery for the layer methods beyond LoRA (IA3, bottleneck adapters, BitFit,
partial fine-tuning, LayerNorm tuning), run by tests/test_ia3.py, test_bottleneck.py,
test_selective.py and test_ln_tuning.py over the model kinds of tests/models.py.

A :class:`Spec` says how to configure a method for a model kind (or that it does not apply) and
which parameters are the method's; each ``check_*`` function asserts one property.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

from peftkit import PeftConfig, PeftModel, PeftkitError, get_peft_model
from peftkit.inject import AdapterLayer

from .models import CASES, Case, randomize_adapters

_BASES: dict[str, nn.Module] = {}


def build(case: Case) -> nn.Module:
    """A fresh copy of the case's model (built once per session, then deep-copied: same weights)."""
    if case.name not in _BASES:
        _BASES[case.name] = case.build()
    return copy.deepcopy(_BASES[case.name])


def value(case: Case, model: nn.Module, batch: int, **extra: Any) -> torch.Tensor:
    """The tensor to compare, one row per batch row. A classifier's logits on a tiny random BERT are
    ~1e-2 and barely move, so for SEQ_CLS the last hidden state is compared too."""
    if case.task_type == "SEQ_CLS":
        res = model(**case.inputs(batch), output_hidden_states=True, **extra)
        return torch.cat([res.hidden_states[-1].flatten(1), res.logits], dim=1)
    return case.output(model(**case.inputs(batch), **extra))


def out(case: Case, model: nn.Module, batch: int = 3, **extra: Any) -> torch.Tensor:
    with torch.no_grad():
        return value(case, model, batch, **extra)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> bool:
    """Equal up to fp32 rounding, relative to the output's scale."""
    return torch.allclose(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=0)


@dataclass
class Spec:
    """How one method is set up per model kind, for the battery."""

    name: str
    config: Callable[[Case], Optional[PeftConfig]]  # None: the method does not apply to this model kind
    markers: tuple[str, ...]  # substrings of in-memory parameter names that belong to the method
    mergeable: bool = True
    second: Callable[[PeftConfig], PeftConfig] = field(default=lambda c: c)  # config of a second adapter

    def is_adapter(self, name: str) -> bool:
        return any(m in name for m in self.markers)

    def setup(self, case: Case) -> tuple[nn.Module, PeftConfig]:
        cfg = self.config(case)
        if cfg is None:
            pytest.skip(f"{self.name} does not apply to {case.name}")
        return build(case), cfg


def case_params(names: Optional[list[str]] = None, slow: tuple[str, ...] = ()) -> list[Any]:
    """``pytest.param`` per model kind; the kinds in ``slow`` are marked slow."""
    params = []
    for c in CASES:
        if names is not None and c.name not in names:
            continue
        marks = [pytest.mark.slow] if c.name in slow else []
        params.append(pytest.param(c, id=c.name, marks=marks))
    return params


# ---------------------------------------------------------------------------------------------
# properties


def check_noop_start(spec: Spec, case: Case) -> None:
    base, cfg = spec.setup(case)
    ref = out(case, base)
    pm = get_peft_model(base, cfg)
    assert torch.allclose(out(case, pm), ref, atol=1e-6)


def check_only_adapter_trains(spec: Spec, case: Case) -> None:
    base, cfg = spec.setup(case)
    pm = get_peft_model(base, cfg)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(spec.is_adapter(n) or "modules_to_save" in n for n in trainable), trainable
    n_train, n_total = pm.get_nb_trainable_parameters()
    assert n_train == sum(pm.get_parameter(n).numel() for n in trainable)
    assert n_total == sum(p.numel() for p in pm.parameters())
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)  # moves tiny gradients too
    pm.train()
    for _ in range(3):
        y = value(case, pm, 4)
        loss = (y.float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        opt.step()
    for n, p in pm.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    changed = [n for n in trainable if spec.is_adapter(n) and not torch.equal(pm.get_parameter(n), before[n])]
    assert changed, "no adapter tensor was trained"


def check_merge(spec: Spec, case: Case) -> None:
    base, cfg = spec.setup(case)
    base_out = out(case, base)
    pm = get_peft_model(base, cfg)
    randomize_adapters(pm, is_adapter=spec.is_adapter)
    ref = out(case, pm)
    assert not torch.allclose(ref, base_out, atol=1e-4), "adapter must change the output"
    if not spec.mergeable:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            pm.merge_adapter()
        with pytest.raises(PeftkitError, match="cannot be merged"):
            pm.merge_and_unload()
        assert close(out(case, pm), ref)  # nothing changed
        plain = pm.unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert torch.allclose(out(case, plain), base_out, atol=1e-6)
        return
    pm.merge_adapter()
    assert close(out(case, pm), ref)
    pm.merge_adapter()  # idempotent
    assert close(out(case, pm), ref)
    pm.unmerge_adapter()
    assert close(out(case, pm), ref)
    with pm.disable_adapter():
        assert close(out(case, pm), base_out, tol=1e-4)
    assert close(out(case, pm), ref)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert close(out(case, merged), ref)


def check_disable(spec: Spec, case: Case) -> None:
    base, cfg = spec.setup(case)
    base_out = out(case, base)
    pm = get_peft_model(base, cfg)
    randomize_adapters(pm, is_adapter=spec.is_adapter)
    ref = out(case, pm)
    assert not torch.allclose(ref, base_out, atol=1e-4)
    with pm.disable_adapter():
        assert torch.allclose(out(case, pm), base_out, atol=1e-6)
    assert torch.allclose(out(case, pm), ref, atol=1e-6)


def check_save_load(spec: Spec, case: Case, tmp_path: Any) -> dict[str, torch.Tensor]:
    """Round trip exact; only the method's tensors are saved; returns the saved tensors."""
    from safetensors.torch import load_file

    base, cfg = spec.setup(case)
    fresh, fresh_again = copy.deepcopy(base), copy.deepcopy(base)
    pm = get_peft_model(base, cfg)
    randomize_adapters(pm, is_adapter=spec.is_adapter)
    ref = out(case, pm)
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in trainable.values())
    assert all(".default" not in k for k in saved)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(out(case, loaded), ref)
    sd1 = {k: v for k, v in pm.state_dict().items() if spec.is_adapter(k) or "modules_to_save" in k}
    sd2 = {k: v for k, v in loaded.state_dict().items() if spec.is_adapter(k) or "modules_to_save" in k}
    assert sd1 and sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable_again = PeftModel.from_pretrained(fresh_again, tmp_path, is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == set(trainable)
    return saved


def check_load_validates_shapes(spec: Spec, case: Case, tmp_path: Any) -> None:
    """A tensor of the wrong shape in the file: CheckpointError naming it, model left unchanged."""
    from safetensors.torch import load_file, save_file

    from peftkit import CheckpointError

    base, cfg = spec.setup(case)
    fresh = copy.deepcopy(base)
    ref = out(case, fresh)
    pm = get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].numel() + 1)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in fresh.modules())
    assert torch.equal(out(case, fresh), ref)


def check_several_adapters(spec: Spec, case: Case) -> None:
    base, cfg = spec.setup(case)
    base_out = out(case, base)
    pm = get_peft_model(base, cfg)
    pm.add_adapter("other", spec.second(cfg))
    assert pm.active_adapter == "default"
    randomize_adapters(pm, seed=2, is_adapter=spec.is_adapter)  # perturbs both adapters
    out_a = out(case, pm)
    pm.set_adapter("other")
    out_b = out(case, pm)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad and spec.is_adapter(n)]
    assert trainable and all(".other" in n for n in trainable)
    pm.set_adapter("default")
    assert torch.allclose(out(case, pm), out_a, atol=1e-6)
    pm.delete_adapter("other")
    assert list(pm.peft_config) == ["default"]
    assert not any(".other" in k for k in pm.state_dict())
    for _, m in pm.named_modules():
        if isinstance(m, AdapterLayer):
            assert "other" not in m.adapter_names
    assert torch.allclose(out(case, pm), out_a, atol=1e-6)
    pm.delete_adapter("default")
    assert not any(isinstance(m, AdapterLayer) for m in pm.modules())
    assert torch.allclose(out(case, pm), base_out, atol=1e-6)


def check_mixed_batch(spec: Spec, case: Case) -> None:
    base, cfg = spec.setup(case)
    pm = get_peft_model(base, cfg)
    pm.add_adapter("b", spec.second(cfg))
    randomize_adapters(pm, seed=3, is_adapter=spec.is_adapter)
    names = ["default", "__base__", "b", "b", "default", "__base__"]
    batch = len(names)
    singles = {}
    for name in ("default", "b"):
        pm.set_adapter(name)
        singles[name] = out(case, pm, batch)
    with pm.disable_adapter():
        singles["__base__"] = out(case, pm, batch)
    assert not torch.allclose(singles["default"], singles["b"], atol=1e-4)
    mixed = out(case, pm, batch, adapter_names=names)
    for row, name in enumerate(names):
        assert torch.allclose(mixed[row], singles[name][row], atol=1e-5), (row, name)
