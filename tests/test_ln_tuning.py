"""LayerNorm tuning: the property battery over every model kind with norm layers, and interop with
Hugging Face PEFT both ways (a test-only dependency)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from peftkit import LNTuningConfig, MergeError, PeftModel, PeftkitError, TargetError, get_peft_model
from peftkit.inject import AdapterLayer

from . import adapter_battery as B
from .models import CASES as MODEL_CASES
from .models import MLP, Case, _logits, _tokens, randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5


class NormNet(nn.Module):
    """A plain module with LayerNorms (the MLP and CNN of tests/models.py have none)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16)
        self.norm0 = nn.LayerNorm(16)
        self.lin1 = nn.Linear(16, 16)
        self.norm1 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm1(torch.relu(self.lin1(self.norm0(self.lin0(x))))))


def _normnet() -> nn.Module:
    torch.manual_seed(0)
    return NormNet().eval()


NORMNET = Case("normnet", _normnet, lambda b: {"x": torch.randn(b, 10, generator=torch.Generator().manual_seed(2))},
               _logits, None)


def _config(case):
    if case.name in ("mlp", "cnn"):
        return None  # no norm layer to tune (see test_model_without_norms_raises)
    return LNTuningConfig(task_type=case.task_type)


SPEC = B.Spec("ln_tuning", _config, markers=("ln_tuning_layers",))
CASES = [pytest.param(NORMNET, id="normnet")] + B.case_params(
    [c.name for c in MODEL_CASES if c.name not in ("mlp", "cnn")], slow=("stories260k",))


@pytest.mark.parametrize("case", CASES)
def test_noop_start(case):
    B.check_noop_start(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_only_norm_copies_train(case):
    B.check_only_adapter_trains(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_unload_exact(case):
    B.check_merge(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_base_output(case):
    B.check_disable(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_save_load_exact_and_only_norms_saved(case, tmp_path):
    saved = B.check_save_load(SPEC, case, tmp_path)
    assert all(".ln_tuning_layers." in k or "classifier" in k for k in saved)


@pytest.mark.parametrize("case", CASES[:2])
def test_load_validates_shapes(case, tmp_path):
    B.check_load_validates_shapes(SPEC, case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_several_adapters_and_delete(case):
    B.check_several_adapters(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_mixed_batch_rows_equal_single_adapter_runs(case):
    B.check_mixed_batch(SPEC, case)


# ---------------------------------------------------------------------------------------------
# targets, keys, semantics


def test_default_targets_and_keys_llama(tmp_path):
    from safetensors.torch import load_file

    pm = get_peft_model(tiny_llama(), LNTuningConfig(task_type="CAUSAL_LM"))
    assert pm.peft_config["default"].target_modules == {"input_layernorm", "post_attention_layernorm", "norm"}  # a set, as Hugging Face PEFT
    pm.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(saved) == sorted(
        [f"base_model.model.model.layers.{i}.{n}.ln_tuning_layers.weight" for i in range(2)
         for n in ("input_layernorm", "post_attention_layernorm")] + ["base_model.model.model.norm.ln_tuning_layers.weight"])
    assert all(t.shape == (16,) for t in saved.values())


def test_model_type_without_default_targets_every_norm():
    pm = get_peft_model(tiny_bert_cls(), LNTuningConfig(task_type="SEQ_CLS"))
    assert pm.peft_config["default"].target_modules == ["LayerNorm"]
    wrapped = [k for k, m in pm.named_modules() if isinstance(m, AdapterLayer) and "classifier" not in k]
    assert len(wrapped) == 5  # embeddings + 2 per layer
    pm = get_peft_model(_normnet(), LNTuningConfig())
    assert pm.peft_config["default"].target_modules == ["norm0", "norm1"]


def test_model_without_norms_raises():
    model = MLP()
    with pytest.raises(TargetError, match="no normalization layer"):
        get_peft_model(model, LNTuningConfig())
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_one_active_adapter_at_a_time():
    pm = get_peft_model(_normnet(), LNTuningConfig())
    pm.add_adapter("b", LNTuningConfig())
    pm.set_adapter(["default", "b"])
    with pytest.raises(PeftkitError, match="only one can be active"):
        pm(torch.randn(2, 10))
    with pytest.raises(MergeError, match="one can be merged"):
        pm.merge_adapter()
    assert not any(m.merged for m in pm.modules() if isinstance(m, AdapterLayer))


def test_merged_adapter_saves_tuned_values(tmp_path):
    pm = get_peft_model(_normnet(), LNTuningConfig())
    randomize_adapters(pm, is_adapter=SPEC.is_adapter)
    x = torch.randn(2, 10)
    with torch.no_grad():
        ref = pm(x)
    pm.merge_adapter()
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_normnet(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_copies_keep_base_dtype_bf16():
    model = tiny_llama().to(torch.bfloat16)
    pm = get_peft_model(model, LNTuningConfig(task_type="CAUSAL_LM"))
    assert all(p.dtype == torch.bfloat16 for n, p in pm.named_parameters() if "ln_tuning_layers" in n)
    with torch.no_grad():
        assert pm(input_ids=_tokens(2, 5, 64)).logits.dtype == torch.bfloat16


def test_config_fields_as_hugging_face():
    peft = pytest.importorskip("peft")
    assert set(LNTuningConfig().to_dict()) == set(peft.LNTuningConfig().to_dict())


# ---------------------------------------------------------------------------------------------
# interop with Hugging Face PEFT

_ids = lambda: {"input_ids": _tokens(3, 7, 64)}  # noqa: E731

INTEROP = {
    "llama": (tiny_llama, _ids, dict(task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, _ids, dict(task_type="CAUSAL_LM")),
    "bert_cls": (tiny_bert_cls, _ids, dict(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    "t5": (tiny_t5, lambda: {"input_ids": _tokens(3, 7, 64), "decoder_input_ids": _tokens(3, 4, 64, seed=3)},
           dict(task_type="SEQ_2_SEQ_LM")),
    "normnet": (_normnet, lambda: NORMNET.inputs(3), dict(target_modules=["norm0", "norm1"])),
}


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln_tuning_layers" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", list(INTEROP))
def test_interop_peftkit_to_hugging_face(name, tmp_path):
    peft = pytest.importorskip("peft", minversion="0.21")
    build, inputs, kw = INTEROP[name]
    kw = {k: v for k, v in kw.items() if not (name == "bert_cls" and k == "target_modules")}  # ours finds them
    ours = get_peft_model(build(), LNTuningConfig(**kw))
    _perturb(ours, 1)
    with torch.no_grad():
        ref = _logits(ours(**inputs()))
        base = _logits(build()(**inputs()))
    assert not torch.allclose(ref, base, atol=1e-4)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        got = _logits(theirs(**inputs()))
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("name", list(INTEROP))
def test_interop_hugging_face_to_peftkit(name, tmp_path):
    peft = pytest.importorskip("peft", minversion="0.21")
    build, inputs, kw = INTEROP[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.LNTuningConfig(**kw))
    _perturb(theirs, 2)
    with torch.no_grad():
        ref = _logits(theirs(**inputs()))
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=Warning)  # no ignored tensor, no unknown config field
        ours = PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        got = _logits(ours(**inputs()))
    assert torch.allclose(got, ref, atol=1e-5)
    from safetensors.torch import load_file

    ours.save_pretrained(tmp_path / "ours")
    a = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
