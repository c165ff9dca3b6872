"""LoRA on ``torch.nn.MultiheadAttention`` (peftkit.methods.lora.mha).

Outputs are compared with a reference computed by ``F.multi_head_attention_forward`` on the adapted
weights ``W_in + s B A`` and ``W_out + s B_o A_o``. Adapter tensors are randomized (non-zero B), so a
no-op cannot pass merge, disable or load checks. The last section cross-loads adapter folders with
Hugging Face PEFT (skipped when it is not installed).

Hugging Face PEFT 0.21.2 adds the out_proj delta twice (its ``merge`` writes ``W_out + s B_o A_o``
and then calls ``out_proj.merge``, which adds it again; its forward merges, so unmerged outputs
are affected too; huggingface/peft#3774). peftkit computes the LoRA definition, ``W_out + s B_o A_o``.
The interop tests therefore check outputs identical with a zero out_proj ``B_o`` and, in general, that
PEFT's output is peftkit's with ``B_o`` doubled (or equal, once PEFT is fixed).
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, MergeError, PeftkitError, TargetError
from peftkit.methods.lora import Linear, MixedBatchUnsupportedError, MultiheadAttention

from .models import randomize_adapters

E, HEADS = 8, 2


class AttnModel(nn.Module):
    """One self-attention block and a head; ``attn_kwargs`` go to the attention call."""

    def __init__(self, batch_first: bool = True, bias: bool = True, kdim=None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim)
        self.lin = nn.Linear(E, 3)

    def forward(self, x, **attn_kwargs):
        out, _ = self.mha(x, x, x, need_weights=False, **attn_kwargs)
        return self.lin(out)


def build(seed: int = 0, **kw) -> AttnModel:
    torch.manual_seed(seed)
    return AttnModel(**kw).eval()


def inputs(batch_first: bool = True) -> torch.Tensor:
    x = torch.randn(3, 5, E, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1)


def peft(model: nn.Module, seed: int = 0, name: str = "default", **kw) -> PeftModel:
    kw.setdefault("target_modules", ["mha"])
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    pm = get_peft_model(model, LoraConfig(**kw), adapter_name=name)
    randomize_adapters(pm, seed=seed, std=0.3)
    return pm.eval()


def reference(layer: MultiheadAttention, names, query, key, value, **kw):
    """``F.multi_head_attention_forward`` on the base weights plus the deltas of ``names``."""
    base = layer.get_base_layer()
    out = base.out_proj
    w_in, b_in = base.in_proj_weight.detach().clone(), base.in_proj_bias.detach().clone()
    w_out = out.get_base_layer().weight.detach().clone()
    b_out = out.get_base_layer().bias.detach().clone()
    for n in names:
        w_in += layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight
        if layer.lora_B[n].bias is not None:
            b_in += layer.scaling[n] * layer.lora_B[n].bias
        w_out += out.scaling[n] * out.lora_B[n].weight @ out.lora_A[n].weight
        if out.lora_B[n].bias is not None:
            b_out += out.scaling[n] * out.lora_B[n].bias
    if base.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    y, attn = F.multi_head_attention_forward(
        query, key, value, E, HEADS, w_in, b_in, None, None, False, 0.0, w_out, b_out,
        training=False, **kw)
    return (y.transpose(0, 1) if base.batch_first else y), attn


# ---------------------------------------------------------------------------------------------
# structure and keys


def test_structure_and_keys_match_hugging_face():
    pm = peft(build())
    layer = pm.base_model.model.mha
    assert isinstance(layer, MultiheadAttention)
    assert isinstance(layer.base_layer, nn.MultiheadAttention)
    assert isinstance(layer.base_layer.out_proj, Linear)
    keys = {k: tuple(v.shape) for k, v in pm.state_dict().items() if "lora_" in k}
    assert keys == {
        "base_model.model.mha.lora_A.default.weight": (2, E),
        "base_model.model.mha.lora_B.default.weight": (3 * E, 2),
        "base_model.model.mha.base_layer.out_proj.lora_A.default.weight": (2, E),
        "base_model.model.mha.base_layer.out_proj.lora_B.default.weight": (E, 2),
    }
    assert set(peftkit.get_peft_model_state_dict(pm)) == {
        "base_model.model.mha.lora_A.weight", "base_model.model.mha.lora_B.weight",
        "base_model.model.mha.base_layer.out_proj.lora_A.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.weight",
    }
    # the attributes code around an attention module reads
    assert (layer.embed_dim, layer.num_heads, layer.batch_first, layer._qkv_same_embed_dim) == (E, HEADS, True, True)
    assert layer.in_proj_weight is layer.get_base_layer().in_proj_weight
    assert layer.out_proj.weight is layer.get_base_layer().out_proj.get_base_layer().weight


def test_only_adapter_tensors_train():
    pm = peft(build())
    trainable = sorted(k for k, p in pm.named_parameters() if p.requires_grad)
    assert trainable == sorted([
        "base_model.model.mha.lora_A.default.weight", "base_model.model.mha.lora_B.default.weight",
        "base_model.model.mha.base_layer.out_proj.lora_A.default.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.default.weight",
    ])


def test_default_init_is_a_no_op():
    model = build()
    x = inputs()
    with torch.no_grad():
        want = model(x)
        pm = get_peft_model(model, LoraConfig(target_modules=["mha"], r=2))
        assert torch.equal(pm(x), want)


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_forward_matches_reference(batch_first, need_weights):
    pm = peft(build(batch_first=batch_first))
    layer = pm.base_model.model.mha
    x = inputs(batch_first)
    q = x * 0.5
    with torch.no_grad():
        got, got_attn = layer(q, x, x, need_weights=need_weights, average_attn_weights=False)
        want, want_attn = reference(layer, ["default"], q, x, x, need_weights=need_weights,
                                    average_attn_weights=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if need_weights:
        assert got_attn.shape == (3, HEADS, 5, 5)
        torch.testing.assert_close(got_attn, want_attn, atol=1e-5, rtol=1e-5)
    else:
        assert got_attn is None


def test_masks_are_passed_through():
    pm = peft(build())
    layer = pm.base_model.model.mha
    x = inputs()
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        got, attn = layer(x, x, x, attn_mask=causal, key_padding_mask=padding)
        want, want_attn = reference(layer, ["default"], x, x, x, attn_mask=causal, key_padding_mask=padding)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, want_attn, atol=1e-5, rtol=1e-5)
    assert attn[1, :, 3:].abs().max() == 0  # padded keys get no attention
    assert attn[0].triu(1).abs().max() == 0  # causal


def test_gradients_reach_both_projections_and_base_is_untouched():
    pm = peft(build())
    pm.train()
    before = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    loss = pm(inputs()).pow(2).mean()
    loss.backward()
    layer = pm.base_model.model.mha
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.base_layer.out_proj.lora_A["default"].weight, layer.base_layer.out_proj.lora_B["default"].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    opt.step()
    after = {k: v for k, v in pm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(layer.get_base_layer().in_proj_weight, nn.Parameter)
    assert not layer.get_base_layer().in_proj_weight.requires_grad


def test_transformer_encoder_layer_eval_uses_the_adapters():
    """nn.TransformerEncoderLayer's fused eval path reads the base weights; it must not be taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)).eval()
    x = inputs()
    with torch.no_grad():
        base = model(x)
    pm = peft(model, target_modules=["self_attn"])
    with torch.no_grad():
        adapted = pm(x)
        pm.merge_adapter()
        merged = pm(x)
        pm.unmerge_adapter()
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_lora_bias_on_the_in_projection():
    pm = peft(build(), lora_bias=True)
    layer = pm.base_model.model.mha
    assert layer.lora_B["default"].bias is not None
    x = inputs()
    with torch.no_grad():
        got, _ = layer(x, x, x)
        want, _ = reference(layer, ["default"], x, x, x)
        unmerged = pm(x)
        pm.merge_adapter()
        merged = pm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_half_precision_base_keeps_the_query_dtype():
    model = build().to(torch.bfloat16)
    pm = peft(model)
    assert pm.base_model.model.mha.lora_A["default"].weight.dtype == torch.float32  # autocast adapter dtype
    with torch.no_grad():
        y = pm(inputs().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# several adapters, disabling


def test_several_adapters_switch_and_combine():
    pm = peft(build(), seed=0, name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["mha"], r=3, lora_alpha=3))
    randomize_adapters(pm, seed=1, std=0.3)
    layer = pm.base_model.model.mha
    x = inputs()
    with torch.no_grad():
        for names in (["a"], ["b"], ["a", "b"]):
            pm.set_adapter(names)
            got, _ = layer(x, x, x)
            want, _ = reference(layer, names, x, x, x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.base_layer.out_proj.active_adapters == ["a", "b"]


def test_disable_adapter():
    model = build()
    x = inputs()
    with torch.no_grad():
        base = model(x)
        pm = peft(model)
        adapted = pm(x)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), base, atol=1e-6, rtol=0)
        torch.testing.assert_close(pm(x), adapted, atol=0, rtol=0)
        pm.merge_adapter()
        with pm.disable_adapter():  # merged adapters are unmerged first
            torch.testing.assert_close(pm(x), base, atol=1e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 1e-3


def test_mixed_adapter_batches_raise_a_clear_error():
    pm = peft(build(), name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["mha"], r=2))
    x = inputs()
    with pytest.raises(MixedBatchUnsupportedError, match="does not support mixed adapter batches"):
        pm(x, adapter_names=["a", "b", "__base__"])
    assert issubclass(MixedBatchUnsupportedError, PeftkitError) and issubclass(MixedBatchUnsupportedError, TypeError)
    pm(x)  # still usable


# ---------------------------------------------------------------------------------------------
# merging and unloading


def test_merge_unmerge_and_merge_and_unload():
    model = build()
    x = inputs()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x)
        pm = peft(model)
        adapted = pm(x)
        pm.merge_adapter()
        torch.testing.assert_close(pm(x), adapted, atol=1e-5, rtol=1e-5)
        pm.merge_adapter()  # idempotent
        torch.testing.assert_close(pm(x), adapted, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(x), adapted, atol=1e-5, rtol=1e-5)
        inner = pm.base_model.model.mha.get_base_layer()
        torch.testing.assert_close(inner.in_proj_weight, base_state["mha.in_proj_weight"], atol=1e-6, rtol=0)
        merged = pm.merge_and_unload()
        assert type(merged.mha) is nn.MultiheadAttention
        assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert not merged.mha._forward_pre_hooks
        assert set(merged.state_dict()) == set(base_state)
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 1e-3


def test_unload_gives_back_the_original_module():
    model = build()
    original_mha, original_out = model.mha, model.mha.out_proj
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = inputs()
    with torch.no_grad():
        base = model(x)
        pm = peft(model)
        pm.merge_adapter()  # unload unmerges first
        plain = pm.unload()
    assert plain.mha is original_mha and plain.mha.out_proj is original_out
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), base, atol=1e-5, rtol=1e-5)


def test_safe_merge_with_nan_changes_nothing():
    pm = peft(build())
    with torch.no_grad():
        pm.base_model.model.mha.lora_B["default"].weight[0, 0] = float("nan")
    inner = pm.base_model.model.mha.get_base_layer()
    before = inner.in_proj_weight.clone(), inner.out_proj.get_base_layer().weight.clone()
    with pytest.raises(MergeError, match="NaN"):
        pm.merge_adapter(safe_merge=True)
    with pytest.raises(MergeError, match="NaN"):
        pm.merge_and_unload(safe_merge=True)
    assert torch.equal(inner.in_proj_weight, before[0])
    assert torch.equal(inner.out_proj.get_base_layer().weight, before[1])
    assert isinstance(pm.base_model.model.mha, MultiheadAttention)
    assert not pm.base_model.model.mha.merged and not inner.out_proj.merged


def test_merge_one_of_two_adapters():
    pm = peft(build(), name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["mha"], r=2))
    randomize_adapters(pm, seed=3, std=0.3)
    x = inputs()
    with torch.no_grad():
        pm.set_adapter(["a", "b"])
        both = pm(x)
        pm.merge_adapter(["a"])  # "b" still runs unmerged
        torch.testing.assert_close(pm(x), both, atol=1e-5, rtol=1e-5)
        merged = pm.merge_and_unload(adapter_names=["a", "b"])
        torch.testing.assert_close(merged(x), both, atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_cat_is_the_weighted_sum():
    pm = peft(build(), name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["mha"], r=3, lora_alpha=6))
    randomize_adapters(pm, seed=4, std=0.3)
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
    layer = pm.base_model.model.mha
    for part in (layer, layer.base_layer.out_proj):
        want = 0.7 * part.delta_weight("a") - 0.4 * part.delta_weight("b")
        torch.testing.assert_close(part.delta_weight("ab"), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# saving, loading, deleting


def test_save_and_load_round_trip(tmp_path):
    pm = peft(build(), name="default")
    pm.add_adapter("other", LoraConfig(target_modules=["mha"], r=4, lora_alpha=2))
    randomize_adapters(pm, seed=5, std=0.3)
    x = inputs()
    with torch.no_grad():
        want = {n: (pm.set_adapter(n), pm(x))[1] for n in ("default", "other")}
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    with torch.no_grad():
        for n in ("default", "other"):
            loaded.set_adapter(n)
            torch.testing.assert_close(loaded(x), want[n], atol=0, rtol=0)


def test_pickle_and_deepcopy():
    pm = peft(build())
    x = inputs()
    with torch.no_grad():
        want = pm(x)
        for clone in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
            torch.testing.assert_close(clone(x), want, atol=0, rtol=0)


def test_delete_adapter_removes_both_parts():
    model = build()
    original_out = model.mha.out_proj
    pm = peft(model, name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["mha"], r=2))
    pm.delete_adapter("a")
    layer = pm.base_model.model.mha
    assert layer.adapter_names == ["b"] and layer.base_layer.out_proj.adapter_names == ["b"]
    assert not any(".a." in k for k in pm.state_dict())
    plain = pm.unload()
    assert plain.mha.out_proj is original_out


# ---------------------------------------------------------------------------------------------
# what is not supported: clear errors, nothing half-written


def _assert_untouched(model: AttnModel, out_proj: nn.Module) -> None:
    assert type(model.mha) is nn.MultiheadAttention and model.mha.out_proj is out_proj


@pytest.mark.parametrize("kw, error, match", [
    (dict(use_dora=True), TargetError, "DoRA"),
    (dict(init_lora_weights="pissa"), TargetError, "PiSSA"),
])
def test_unsupported_configs(kw, error, match):
    model = build()
    out_proj = model.mha.out_proj
    with pytest.raises(error, match=match):
        get_peft_model(model, LoraConfig(target_modules=["mha"], **kw))
    _assert_untouched(model, out_proj)


def test_lora_bias_needs_a_biased_base():
    model = build(bias=False)
    out_proj = model.mha.out_proj
    with pytest.raises(ConfigError, match="bias=False"):
        get_peft_model(model, LoraConfig(target_modules=["mha"], lora_bias=True))
    _assert_untouched(model, out_proj)


def test_separate_qkv_weights_are_refused():
    model = build(kdim=6)
    out_proj = model.mha.out_proj
    with pytest.raises(TargetError, match="packed q/k/v"):
        get_peft_model(model, LoraConfig(target_modules=["mha"]))
    _assert_untouched(model, out_proj)


def test_failing_second_adapter_leaves_the_first_intact():
    pm = peft(build(), name="a")
    x = inputs()
    with torch.no_grad():
        want = pm(x)
    with pytest.raises(TargetError, match="DoRA"):
        pm.add_adapter("b", LoraConfig(target_modules=["mha"], use_dora=True))
    layer = pm.base_model.model.mha
    assert layer.adapter_names == ["a"] and layer.base_layer.out_proj.adapter_names == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# interop with Hugging Face PEFT (test-only dependency)


def _hf():
    return pytest.importorskip("peft", minversion="0.21")


def _zero_out_proj_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()


def _double_out_proj_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.mul_(2)


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def _hf_load(hf, folder):
    """peft.PeftModel.from_pretrained, failing on Hugging Face's "missing adapter keys" warning."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        model = hf.PeftModel.from_pretrained(build(), folder).eval()
    assert not [str(w.message) for w in log if "missing adapter keys" in str(w.message)]
    return model


@pytest.mark.parametrize("zero_out_proj", [True, False])
def test_peftkit_folder_loads_in_hugging_face(tmp_path, zero_out_proj):
    hf = _hf()
    pm = peft(build(), r=3, lora_alpha=5, rank_pattern={"mha": 4})
    if zero_out_proj:
        _zero_out_proj_b(pm)
    x = inputs()
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(tmp_path)
    loaded = _hf_load(hf, tmp_path)
    assert _lora_tensors(loaded).keys() == _lora_tensors(pm).keys()
    for k, v in _lora_tensors(pm).items():
        assert torch.equal(_lora_tensors(loaded)[k], v), k
    with torch.no_grad():
        got = loaded(x)
        if zero_out_proj:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            return
        _double_out_proj_b(pm)  # Hugging Face PEFT 0.21.2 adds the out_proj delta twice (module doc)
        doubled = pm(x)
    assert torch.allclose(got, doubled, atol=1e-5) or torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("zero_out_proj", [True, False])
def test_hugging_face_folder_loads_in_peftkit(tmp_path, zero_out_proj):
    hf = _hf()
    torch.manual_seed(3)
    hf_model = hf.get_peft_model(build(), hf.LoraConfig(target_modules=["mha"], r=2, lora_alpha=6, init_lora_weights=False))
    hf_model.add_adapter("other", hf.LoraConfig(target_modules=["mha"], r=4, lora_alpha=4, init_lora_weights=False))
    if zero_out_proj:
        _zero_out_proj_b(hf_model)
    hf_model.eval()
    x = inputs()
    with torch.no_grad():
        want = {n: (hf_model.set_adapter(n), hf_model(x))[1] for n in ("default", "other")}
    hf_model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftkitWarning)  # no tensor ignored
        loaded = PeftModel.from_pretrained(build(), tmp_path)
        loaded.load_adapter(tmp_path / "other", "other")
    hf_tensors = _lora_tensors(hf_model)
    assert _lora_tensors(loaded).keys() == hf_tensors.keys()
    for k, v in _lora_tensors(loaded).items():
        assert torch.equal(hf_tensors[k], v), k
    loaded.eval()
    with torch.no_grad():
        for n in ("default", "other"):
            loaded.set_adapter(n)
            got = loaded(x)
            if zero_out_proj:
                torch.testing.assert_close(got, want[n], atol=1e-5, rtol=1e-5)
    if not zero_out_proj:
        _double_out_proj_b(loaded)  # Hugging Face PEFT 0.21.2 adds the out_proj delta twice (module doc)
        with torch.no_grad():
            for n in ("default", "other"):
                loaded.set_adapter(n)
                assert torch.allclose(loaded(x), want[n], atol=1e-5)


def test_adapter_config_matches_hugging_face(tmp_path):
    hf = _hf()
    pm = peft(build())
    pm.save_pretrained(tmp_path / "kit")
    hf_model = hf.get_peft_model(build(), hf.LoraConfig(target_modules=["mha"], r=2, lora_alpha=4))
    hf_model.save_pretrained(tmp_path / "hf")
    kit_cfg = json.loads((tmp_path / "kit" / "adapter_config.json").read_text())
    hf_cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert kit_cfg.keys() == hf_cfg.keys()
    for key in ("r", "lora_alpha", "target_modules", "peft_type", "lora_bias", "use_dora"):
        assert kit_cfg[key] == hf_cfg[key], key


def test_targeting_out_proj_alone_warns():
    """The attention never calls its out_proj, so an adapter there alone would be dead weight."""
    model = build()
    with pytest.warns(peftkit.PeftkitWarning, match="never calls"):
        get_peft_model(model, LoraConfig(target_modules=["out_proj"]))


def test_targeting_mha_and_its_out_proj_adapts_once():
    pm = get_peft_model(build(), LoraConfig(target_modules=["mha", "out_proj"], r=2))
    keys = sorted(k for k in pm.state_dict() if "lora_A" in k)
    assert keys == ["base_model.model.mha.base_layer.out_proj.lora_A.default.weight",
                    "base_model.model.mha.lora_A.default.weight"]


def test_get_delta_weight_in_the_base_dtype():
    pm = peft(build().to(torch.bfloat16))
    layer = pm.base_model.model.mha
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.bfloat16 and delta.shape == (3 * E, E)
    torch.testing.assert_close(delta.float(), layer.delta_weight("default"), atol=1e-2, rtol=1e-2)
