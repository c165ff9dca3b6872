"""(IA)³: the property battery over every model kind, its math pinned on an MLP, and interop with
Hugging Face PEFT both ways (a test-only dependency)."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from peftkit import ConfigError, IA3Config, MergeError, PeftModel, PeftkitError, TargetError, get_peft_model
from peftkit.inject import AdapterLayer

from . import adapter_battery as B
from .models import MLP, _tokens, randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

CUSTOM = {
    "mlp": dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),
    "cnn": dict(target_modules=["conv1d", "conv2d", "conv2d_1x1", "head"], feedforward_modules=["conv2d_1x1", "head"]),
}


def _config(case):
    return IA3Config(task_type=case.task_type, **CUSTOM.get(case.name, {}))


SPEC = B.Spec("ia3", _config, markers=("ia3_l",))
CASES = B.case_params(slow=("stories260k",))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Conv1D.*")
        yield


@pytest.mark.parametrize("case", CASES)
def test_noop_start(case):
    B.check_noop_start(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_only_ia3_vectors_train(case):
    B.check_only_adapter_trains(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_unload_exact(case):
    B.check_merge(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_base_output(case):
    B.check_disable(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_save_load_exact_and_only_vectors_saved(case, tmp_path):
    saved = B.check_save_load(SPEC, case, tmp_path)
    assert all(k.endswith(".ia3_l") or "classifier" in k for k in saved)


@pytest.mark.parametrize("case", B.case_params(["mlp", "llama"]))
def test_load_validates_shapes(case, tmp_path):
    B.check_load_validates_shapes(SPEC, case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_several_adapters_and_delete(case):
    B.check_several_adapters(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_mixed_batch_rows_equal_single_adapter_runs(case):
    B.check_mixed_batch(SPEC, case)


# ---------------------------------------------------------------------------------------------
# the math, pinned


def _mlp_pm(**kw):
    torch.manual_seed(0)
    base = MLP().eval()
    pm = get_peft_model(copy.deepcopy(base), IA3Config(**{**CUSTOM["mlp"], **kw}))
    return base, pm


def test_math_output_and_input_scaling_on_mlp():
    base, pm = _mlp_pm()
    g = torch.Generator().manual_seed(5)
    l0 = torch.rand(20, 1, generator=g) + 0.5  # lin0: output scaling, (out, 1)
    l1 = torch.rand(1, 20, generator=g) + 0.5  # lin1: feed-forward, input scaling, (1, in)
    layers = dict(pm.named_modules())
    with torch.no_grad():
        layers["base_model.model.lin0"].ia3_l["default"].copy_(l0)
        layers["base_model.model.lin1"].ia3_l["default"].copy_(l1)
    x = torch.randn(4, 10, generator=g)
    h = torch.relu((x @ base.lin0.weight.T + base.lin0.bias) * l0.T)
    h = torch.relu((h * l1) @ base.lin1.weight.T + base.lin1.bias)
    expected = h @ base.lin2.weight.T + base.lin2.bias
    with torch.no_grad():
        assert torch.allclose(pm(x), expected, atol=1e-6)


def test_several_active_adapters_multiply():
    base, pm = _mlp_pm()
    pm.add_adapter("b", IA3Config(**CUSTOM["mlp"]))
    randomize_adapters(pm, seed=7, std=0.3, is_adapter=SPEC.is_adapter)
    layers = dict(pm.named_modules())
    x = torch.randn(3, 10)
    pm.set_adapter(["default", "b"])
    with torch.no_grad():
        both = pm(x)
    # one adapter holding the product of the two vectors gives the same output
    ref = get_peft_model(copy.deepcopy(base), IA3Config(**CUSTOM["mlp"]))
    ref_layers = dict(ref.named_modules())
    with torch.no_grad():
        for key in ("lin0", "lin1"):
            layer = layers[f"base_model.model.{key}"]
            ref_layers[f"base_model.model.{key}"].ia3_l["default"].copy_(layer.ia3_l["default"] * layer.ia3_l["b"])
        assert torch.allclose(both, ref(x), atol=1e-6)
    pm.merge_adapter()  # merging both multiplies both in
    with torch.no_grad():
        assert torch.allclose(pm(x), both, atol=1e-5)


def test_keys_shapes_and_file_names_as_hugging_face(tmp_path):
    from safetensors.torch import load_file

    pm = get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    cfg = pm.peft_config["default"]
    assert sorted(cfg.target_modules) == ["down_proj", "k_proj", "v_proj"] and cfg.feedforward_modules == {"down_proj"}
    pm.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0."
    assert saved[p + "self_attn.k_proj.ia3_l"].shape == (8, 1)  # 2 kv heads x 4
    assert saved[p + "self_attn.v_proj.ia3_l"].shape == (8, 1)
    assert saved[p + "mlp.down_proj.ia3_l"].shape == (1, 32)
    assert len(saved) == 6
    assert "base_model.model.model.layers.0.self_attn.k_proj.ia3_l.default" in pm.state_dict()


def test_config_fields_as_hugging_face():
    peft = pytest.importorskip("peft")
    assert set(IA3Config().to_dict()) == set(peft.IA3Config().to_dict())
    ours, theirs = IA3Config().to_dict(), peft.IA3Config().to_dict()
    for k in ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights"):
        assert ours[k] == theirs[k]


def test_merge_safe_and_zero_vector_unmerge_warns():
    base, pm = _mlp_pm()
    layer = dict(pm.named_modules())["base_model.model.lin0"]
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        pm.merge_adapter(safe_merge=True)
    assert not layer.merged
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = 0.0
    pm.merge_adapter()
    with pytest.warns(Warning, match="zero entries"):
        pm.unmerge_adapter()


def test_init_ia3_weights_false_is_random():
    _, pm = _mlp_pm(init_ia3_weights=False)
    v = dict(pm.named_modules())["base_model.model.lin0"].ia3_l["default"]
    assert not torch.equal(v, torch.ones_like(v))


def test_mixed_batch_generate_llama():
    case = next(c for c in B.CASES if c.name == "llama")
    pm = get_peft_model(B.build(case), IA3Config(task_type="CAUSAL_LM"))
    pm.add_adapter("b", IA3Config(task_type="CAUSAL_LM"))
    randomize_adapters(pm, seed=4, std=0.5, is_adapter=SPEC.is_adapter)
    names = ["default", "b", "__base__"]
    inputs = case.inputs(3)
    kw = dict(max_new_tokens=4, do_sample=False)
    mixed = pm.generate(**inputs, adapter_names=names, **kw)
    for row, name in enumerate(names):
        one = {k: v[row: row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with pm.disable_adapter():
                single = pm.generate(**one, **kw)
        else:
            pm.set_adapter(name)
            single = pm.generate(**one, **kw)
        assert torch.equal(mixed[row, : single.shape[1]], single[0]), (row, name)


# ---------------------------------------------------------------------------------------------
# bad input


def test_feedforward_modules_must_be_subset_of_targets():
    with pytest.raises(ConfigError, match="subset"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    assert issubclass(ConfigError, PeftkitError)


def test_unknown_model_type_needs_feedforward_modules():
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="feedforward_modules"):
        get_peft_model(model, IA3Config(target_modules=["lin0"]))
    with pytest.raises(ConfigError, match="target_modules"):
        get_peft_model(model, IA3Config())
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_module_leaves_model_unchanged():
    from .models import CNN

    model = CNN()
    with pytest.raises(TargetError, match="Embedding"):
        get_peft_model(model, IA3Config(target_modules=["conv1d", "emb"], feedforward_modules=[]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_feedforward_disagreement_between_adapters_raises():
    _, pm = _mlp_pm()
    with pytest.raises(TargetError, match="feedforward_modules"):
        pm.add_adapter("b", IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin0"]))
    assert list(pm.peft_config) == ["default"]
    assert all(layer.adapter_names == ["default"] for _, layer in pm.base_model.model.named_modules()
               if isinstance(layer, AdapterLayer))


# ---------------------------------------------------------------------------------------------
# interop with Hugging Face PEFT


def _inputs_llama():
    return {"input_ids": _tokens(3, 7, 64)}


def _mlp_builder():
    torch.manual_seed(0)
    return MLP().eval()


def _cnn_builder():
    from .models import CNN

    torch.manual_seed(0)
    return CNN().eval()


def _cnn_inputs():
    return {"x": torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2)), "tokens": _tokens(3, 5, 30)}


INTEROP = {
    "llama": (tiny_llama, _inputs_llama, dict(task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, _inputs_llama, dict(task_type="CAUSAL_LM")),
    "bert_cls": (tiny_bert_cls, _inputs_llama, dict(task_type="SEQ_CLS")),
    "t5": (tiny_t5, lambda: {"input_ids": _tokens(3, 7, 64), "decoder_input_ids": _tokens(3, 4, 64, seed=3)},
           dict(task_type="SEQ_2_SEQ_LM")),
    "mlp": (_mlp_builder, lambda: {"x": torch.randn(3, 10, generator=torch.Generator().manual_seed(2))},
            dict(target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin1"])),
    "conv2d": (_cnn_builder, _cnn_inputs, dict(target_modules=["conv2d", "conv2d_1x1", "head"],
                                               feedforward_modules=["conv2d_1x1"])),
}


def _logits(o):
    return o.logits if hasattr(o, "logits") else o


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("name", list(INTEROP))
def test_interop_peftkit_to_hugging_face(name, tmp_path):
    peft = pytest.importorskip("peft", minversion="0.21")
    build, inputs, kw = INTEROP[name]
    ours = get_peft_model(build(), IA3Config(**kw))
    _perturb(ours, 1)
    with torch.no_grad():
        ref = _logits(ours(**inputs()))
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        got = _logits(theirs(**inputs()))
    assert torch.allclose(got, ref, atol=1e-5)
    # the HF model really holds our non-trivial vectors
    assert any("ia3_l" in n and not torch.all(p == 1) for n, p in theirs.named_parameters())


@pytest.mark.parametrize("name", list(INTEROP))
def test_interop_hugging_face_to_peftkit(name, tmp_path):
    peft = pytest.importorskip("peft", minversion="0.21")
    build, inputs, kw = INTEROP[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.IA3Config(**kw))
    _perturb(theirs, 2)
    with torch.no_grad():
        ref = _logits(theirs(**inputs()))
    theirs.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as fh:
        assert json.load(fh)["peft_type"] == "IA3"
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=Warning)  # no "ignored tensors" / unknown-field warning
        warnings.filterwarnings("ignore", message=".*Conv1D.*")
        ours = PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        got = _logits(ours(**inputs()))
    assert torch.allclose(got, ref, atol=1e-5)
    # same file keys and shapes both ways
    from safetensors.torch import load_file

    ours.save_pretrained(tmp_path / "ours")
    a = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
