"""LoRA on bare parameters (``LoraConfig.target_parameters``): MoE expert tensors and 2-D parameters.

Checked against an explicit reference (per-expert ``W_e + s·B_e A_e`` with Hugging Face PEFT's
layout: ``A_e = lora_A[e·r:(e+1)·r]``, ``B_e = lora_B[:, e::E]``), against LoRA on the same
``nn.Linear`` through ``target_modules``, and against Hugging Face PEFT itself (folders both ways,
identical outputs; skipped when peft is not installed). Models are built in-process: a small
experts module in both layouts ((E, out, in), and (E, in, out) marked ``is_transposed`` as gpt-oss),
and tiny random Qwen3-MoE / gpt-oss / Mixtral models of transformers 5.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core import AdapterLayer
from peftkit.errors import ConfigError, MergeError, PeftkitError, TargetError
from peftkit.methods.lora import ParamWrapper

from .models import randomize_adapters

E, D, H = 4, 6, 5  # experts, hidden, expert intermediate size


class Experts(nn.Module):
    """All experts in two 3-D parameters; every expert runs on its slice of the input (E, n, D)."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        shapes = ((E, D, 2 * H), (E, H, D)) if transposed else ((E, 2 * H, D), (E, D, H))
        self.gate_up_proj = nn.Parameter(torch.randn(shapes[0]) * 0.5)
        self.down_proj = nn.Parameter(torch.randn(shapes[1]) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu, dp = self.gate_up_proj, self.down_proj
        if not self.is_transposed:
            gu, dp = gu.transpose(1, 2), dp.transpose(1, 2)
        gate, up = torch.bmm(x, gu).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, dp)


class MoeNet(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.experts = Experts(transposed)
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.experts(x))


def build(transposed: bool = False) -> MoeNet:
    torch.manual_seed(0)
    return MoeNet(transposed).eval()


def inputs() -> torch.Tensor:
    return torch.randn(E, 3, D, generator=torch.Generator().manual_seed(1))


BOTH = ["experts.gate_up_proj", "experts.down_proj"]


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 2, "lora_alpha": 6, "target_modules": [], "target_parameters": BOTH, **kw})


def adapted(transposed: bool = False, seed: int = 0, **kw) -> PeftModel:
    model = get_peft_model(build(transposed), config(**kw))
    randomize_adapters(model, seed, std=0.3)
    return model


def run(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs() if x is None else x)


def wrapper(model: PeftModel, name: str) -> ParamWrapper:
    for module in model.modules():
        if isinstance(module, ParamWrapper) and module.parameter_name == name:
            return module
    raise AssertionError(name)


def reference_delta(layer: ParamWrapper, adapter: str = "default") -> torch.Tensor:
    """ΔW written out expert by expert, in the parameter's layout."""
    A, B = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
    n, r, s = layer.num_experts, layer.r[adapter], layer.scaling[adapter]
    deltas = [s * B[:, e::n] @ A[e * r:(e + 1) * r] for e in range(n)]
    if layer.stores_in_out:
        deltas = [d.T for d in deltas]
    return torch.stack(deltas).view(layer.param_shape)


def reference_output(model: PeftModel, transposed: bool, adapters=("default",)) -> torch.Tensor:
    """The base network with each targeted parameter replaced by ``W + Σ ΔW``."""
    ref = build(transposed)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            layer = wrapper(model, name)
            getattr(ref.experts, name).add_(sum(reference_delta(layer, a) for a in adapters))
    return run(ref)


# ---------------------------------------------------------------------------------------------
# shapes, keys, math


@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
def test_shapes_keys_and_math_match_reference(transposed, tmp_path):
    model = adapted(transposed)
    gate, down = wrapper(model, "gate_up_proj"), wrapper(model, "down_proj")
    # the module's first parameter is innermost: its wrapper is the base layer of the second's
    assert model.base_model.model.experts is down and down.base_layer is gate
    assert (gate.in_features, gate.out_features, gate.num_experts) == (D, 2 * H, E)
    assert (down.in_features, down.out_features) == (H, D)
    assert tuple(gate.lora_A["default"].weight.shape) == (E * 2, D)
    assert tuple(gate.lora_B["default"].weight.shape) == (2 * H, E * 2)
    out = run(model)
    assert not torch.allclose(out, run(build(transposed)), atol=1e-3)
    torch.testing.assert_close(out, reference_output(model, transposed), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gate.delta_weight("default"), reference_delta(gate), atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.experts.base_layer.lora_A.weight": (E * 2, D),
        "base_model.model.experts.base_layer.lora_B.weight": (2 * H, E * 2),
        "base_model.model.experts.lora_A.weight": (E * 2, H),
        "base_model.model.experts.lora_B.weight": (D, E * 2),
    }
    saved = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert saved["target_parameters"] == BOTH and saved["target_modules"] == []


def test_two_dim_parameter_equals_lora_on_the_linear_module():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    x = torch.randn(5, 6)
    by_module = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    by_param = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=[], target_parameters=["0.weight"],
                                                              init_lora_weights=False))
    layer = by_param.base_model.model[0]
    assert isinstance(layer, ParamWrapper) and (layer.in_features, layer.out_features, layer.num_experts) == (6, 7, 1)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(by_module.base_model.model[0].lora_A["default"].weight)
        layer.lora_B["default"].weight.copy_(by_module.base_model.model[0].lora_B["default"].weight)
    torch.testing.assert_close(run(by_param, x), run(by_module, x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(run(by_param, x), run(base, x), atol=1e-4)


def test_default_init_is_a_no_op_and_rank_pattern_applies_to_parameter_keys():
    model = get_peft_model(build(), config(init_lora_weights=True, rank_pattern={"experts.down_proj": 3}))
    torch.testing.assert_close(run(model), run(build()), atol=0, rtol=0)
    assert wrapper(model, "down_proj").r["default"] == 3 and wrapper(model, "gate_up_proj").r["default"] == 2
    assert tuple(wrapper(model, "down_proj").lora_A["default"].weight.shape) == (3 * E, H)


def test_forward_leaves_the_module_as_it_was_and_only_lora_trains():
    model = adapted()
    experts = wrapper(model, "gate_up_proj").get_base_layer()
    params = dict(experts.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    out = model(inputs())
    assert type(experts) is Experts and not hasattr(experts, "parametrizations")
    assert list(experts._parameters) == ["gate_up_proj", "down_proj"]
    assert all(experts._parameters[k] is p for k, p in params.items())
    out.pow(2).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in params.values())
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(torch.equal(before[k], p) for k, p in params.items())


def test_fold_keeps_the_parameter_dtype_under_autocast():
    model = adapted()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs())  # a dtype change would make the parametrization fail
    half = adapted()
    half.base_model.model.to(torch.bfloat16)
    out = run(half, inputs().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# several adapters, disable, merging


def test_several_adapters_switch_combine_and_delete():
    model = adapted()
    out_default = run(model)
    model.add_adapter("other", config())
    randomize_adapters(model, 5, std=0.3, is_adapter=lambda n: ".other." in n)
    assert sum(isinstance(m, ParamWrapper) for m in model.modules()) == 2  # the wrappers are shared
    assert set(wrapper(model, "gate_up_proj").lora_A) == {"default", "other"}
    model.set_adapter("other")
    out_other = run(model)
    torch.testing.assert_close(out_other, reference_output(model, False, ("other",)), atol=1e-5, rtol=1e-5)
    model.set_adapter(["default", "other"])
    torch.testing.assert_close(run(model), reference_output(model, False, ("default", "other")), atol=1e-5, rtol=1e-5)
    model.set_adapter("default")
    torch.testing.assert_close(run(model), out_default, atol=0, rtol=0)
    model.delete_adapter("other")
    assert set(wrapper(model, "down_proj").lora_A) == {"default"}
    torch.testing.assert_close(run(model), out_default, atol=0, rtol=0)
    assert not torch.allclose(out_default, out_other, atol=1e-3)


def test_adapters_must_target_the_same_parameters():
    model = adapted()
    out = run(model)
    keys = set(model.state_dict())
    with pytest.raises(TargetError, match="all adapters must target the same set of parameters"):
        model.add_adapter("other", config(target_parameters=["experts.down_proj"]))
    assert "other" not in model.peft_config and set(model.state_dict()) == keys
    torch.testing.assert_close(run(model), out, atol=0, rtol=0)
    model.add_adapter("mods", LoraConfig(r=2, target_modules=["lin"]))  # module targets beside are fine
    assert "mods" in model.peft_config


def test_disable_adapter_gives_the_base_output():
    model = adapted()
    base, out = run(build()), run(model)
    with model.disable_adapter():
        torch.testing.assert_close(run(model), base, atol=0, rtol=0)
    torch.testing.assert_close(run(model), out, atol=0, rtol=0)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transposed", [False, True], ids=["E_out_in", "E_in_out"])
def test_merge_unmerge_merge_and_unload_unload(transposed):
    model = adapted(transposed)
    model.add_adapter("other", config())
    randomize_adapters(model, 5, std=0.3, is_adapter=lambda n: ".other." in n)
    base_weights = {k: v.clone() for k, v in build(transposed).state_dict().items()}
    out = run(model)
    model.merge_adapter()
    assert wrapper(model, "gate_up_proj").merged and wrapper(model, "down_proj").merged
    torch.testing.assert_close(run(model), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model), out, atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules()) and type(merged.experts) is Experts
    torch.testing.assert_close(run(merged), out, atol=1e-5, rtol=1e-5)
    both = copy.deepcopy(model).merge_and_unload(adapter_names=["default", "other"])
    torch.testing.assert_close(run(both), reference_output(model, transposed, ("default", "other")), atol=1e-5,
                               rtol=1e-5)
    plain = model.unload()
    assert type(plain.experts) is Experts
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, base_weights[k], atol=1e-6, rtol=0)


def test_safe_merge_of_a_broken_adapter_changes_nothing():
    model = adapted()
    with torch.no_grad():
        wrapper(model, "down_proj").lora_A["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(MergeError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, ParamWrapper))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) or torch.isnan(v).any() for k, v in before.items())


# ---------------------------------------------------------------------------------------------
# saving and loading


def test_save_load_round_trip_in_any_order(tmp_path):
    model = adapted()
    model.add_adapter("other", config())
    randomize_adapters(model, 5, std=0.3, is_adapter=lambda n: ".other." in n)
    outs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outs[name] = run(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), os.path.join(tmp_path, "other"), adapter_name="other")
    loaded.load_adapter(tmp_path, adapter_name="default")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        torch.testing.assert_close(run(loaded), outs[name], atol=0, rtol=0)
    config_back = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert config_back.target_parameters == BOTH


def test_parameters_only_on_a_model_without_default_targets_keeps_target_modules_none(tmp_path):
    model = get_peft_model(build(), LoraConfig(target_parameters=["down_proj"], init_lora_weights=False))
    assert model.peft_config["default"].target_modules is None
    model.save_pretrained(tmp_path)
    assert json.load(open(os.path.join(tmp_path, "adapter_config.json")))["target_modules"] is None
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(run(loaded), run(model), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-written


def _unchanged(model: nn.Module) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("kw,match", [
    ({"target_parameters": ["experts.gate_up_prj"]}, "matched any target_parameters entry .*experts.gate_up_prj.*gate_up_proj"),
    ({"target_parameters": ["down_proj", "nothing_here"]}, "'nothing_here'"),
    ({"target_parameters": ["lin.bias"]}, "shape \\(6,\\).*2-D"),
    ({"target_parameters": ["experts.scale"]}, "entry .*experts.scale"),  # a buffer, not a parameter
    ({"target_parameters": ["experts.steps"]}, "dtype torch.int64"),
    ({"target_parameters": ["down_proj"], "lora_dropout": 0.1}, "does not work with lora_dropout"),
    ({"target_parameters": ["down_proj"], "use_dora": True}, "does not work with use_dora"),
    ({"target_parameters": ["down_proj"], "lora_bias": True}, "does not work with lora_bias"),
    ({"target_parameters": ["down_proj"], "fan_in_fan_out": True}, "does not work with fan_in_fan_out"),
    ({"target_parameters": ["down_proj"], "init_lora_weights": "pissa"}, "does not work with init_lora_weights"),
    ({"target_parameters": ["lin.weight"], "target_modules": ["lin"]}, "cannot also be targeted"),
])
def test_bad_targets_and_features_raise_and_change_nothing(kw, match):
    model = build()
    model.experts.register_buffer("scale", torch.ones(2, 2))
    model.experts.steps = nn.Parameter(torch.zeros(E, 2, 2, dtype=torch.long), requires_grad=False)
    with pytest.raises(PeftkitError, match=match):
        get_peft_model(model, config(**kw))
    assert _unchanged(model)
    assert [n for n, _ in model.experts.named_parameters()] == ["gate_up_proj", "down_proj", "steps"]


def test_parameter_of_the_top_level_module_and_regex_string_raise():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.param = nn.Parameter(torch.zeros(4, 4))

    with pytest.raises(TargetError, match="top-level module is not supported \\(parameter 'param'\\)"):
        get_peft_model(Bare(), LoraConfig(target_parameters=["param"]))
    with pytest.raises(ConfigError, match="target_parameters"):
        LoraConfig(target_parameters="experts\\..*")


def test_second_adapter_module_target_on_a_wrapped_module_raises():
    model = get_peft_model(build(), LoraConfig(target_modules=[], target_parameters=["lin.weight"]))
    with pytest.raises(TargetError, match="adapted through target_parameters"):
        model.add_adapter("other", LoraConfig(target_modules=["lin"]))
    assert "other" not in model.peft_config


def test_unsupported_operations_say_so():
    model = adapted()
    model.add_adapter("other", config())
    with pytest.raises(PeftkitError, match="does not support mixed adapter batches"):
        model(inputs(), adapter_names=["default", "other", "default", "other"])
    with pytest.raises(PeftkitError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    assert "mix" not in model.peft_config


def test_parameter_with_a_parametrization_of_its_own():
    class PlusOne(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w + 1

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3, bias=False))
    nn.init.ones_(net[0].weight)
    nn.utils.parametrize.register_parametrization(net[0], "weight", PlusOne())
    x = torch.ones(2, 3)
    base = net(x).detach()
    model = get_peft_model(net, LoraConfig(r=1, lora_alpha=3, target_modules=[], target_parameters=["0.weight"],
                                           init_lora_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(1.0)
    # (1 + 1 + 3·1·1) · 3 inputs of 1
    torch.testing.assert_close(run(model, x), torch.full((2, 3), 15.0))
    assert len(layer.get_base_layer().parametrizations["weight"]) == 1
    with pytest.raises(MergeError, match="parametrization of its own"):
        model.merge_adapter()
    torch.testing.assert_close(model.unload()(x), base)


# ---------------------------------------------------------------------------------------------
# transformers 5 MoE models (experts stored as 3-D parameters)


def tiny_moe(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, max_position_embeddings=64)
    if kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if kind == "gpt_oss":
        cfg = tf.GptOssConfig(**common, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
                              layer_types=["full_attention"] * 2, sliding_window=8)
        return tf.GptOssForCausalLM(cfg).eval()
    cfg = tf.MixtralConfig(**common, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
    return tf.MixtralForCausalLM(cfg).eval()


MOE = ["qwen3_moe", "gpt_oss", "mixtral"]
MOE_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", MOE)
def test_tiny_moe_models(kind):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    base_out = _logits(tiny_moe(kind), ids)
    model = get_peft_model(tiny_moe(kind), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      target_parameters=MOE_TARGETS, task_type="CAUSAL_LM"))
    assert sum(isinstance(m, ParamWrapper) for m in model.modules()) == 4
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamWrapper) and experts.parameter_name == "down_proj"
    assert experts.stores_in_out == (kind == "gpt_oss")
    randomize_adapters(model, 0, std=0.3)
    out = _logits(model, ids)
    assert not torch.allclose(out, base_out, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), base_out, atol=1e-6, rtol=1e-6)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), out, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    # one training step moves only adapter tensors
    model.train()
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())
    assert all("lora_" in k for k, v in model.named_parameters() if v.requires_grad)


# ---------------------------------------------------------------------------------------------
# interop with Hugging Face PEFT (both ways, identical outputs)


@pytest.fixture
def hf():
    return pytest.importorskip("peft", minversion="0.21")


INTEROP = [
    ("experts_E_out_in", lambda: build(False), BOTH),
    ("experts_E_in_out", lambda: build(True), BOTH),
    ("one_of_two", lambda: build(False), ["down_proj"]),
    ("two_dim", lambda: build(False), ["lin.weight"]),
]


def _hf_keys(folder: str) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("name,make,targets", INTEROP, ids=[s[0] for s in INTEROP])
def test_interop_custom_module_both_ways(hf, tmp_path, name, make, targets):
    kw = dict(r=2, lora_alpha=6, target_modules=[], target_parameters=targets, init_lora_weights=False)
    ours = get_peft_model(make(), LoraConfig(**kw))
    randomize_adapters(ours, 0, std=0.3)
    ours.save_pretrained(tmp_path / "kit")
    theirs = hf.PeftModel.from_pretrained(make(), str(tmp_path / "kit"))
    torch.testing.assert_close(run(theirs), run(ours), atol=1e-5, rtol=1e-5)
    # and back
    theirs = hf.get_peft_model(make(), hf.LoraConfig(**kw))
    randomize_adapters(theirs, 1, std=0.3)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours_back = PeftModel.from_pretrained(make(), tmp_path / "hf")
    torch.testing.assert_close(run(ours_back), run(theirs), atol=1e-5, rtol=1e-5)
    assert _hf_keys(str(tmp_path / "kit")) == _hf_keys(str(tmp_path / "hf"))
    ours_json = json.load(open(tmp_path / "kit" / "adapter_config.json"))
    hf_json = json.load(open(tmp_path / "hf" / "adapter_config.json"))
    assert ours_json["target_parameters"] == hf_json["target_parameters"] == targets


@pytest.mark.parametrize("kind", MOE)
def test_interop_tiny_moe_both_ways(hf, tmp_path, kind):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=MOE_TARGETS, task_type="CAUSAL_LM")
    ours = get_peft_model(tiny_moe(kind), LoraConfig(**kw))
    randomize_adapters(ours, 0, std=0.3)
    ours.save_pretrained(tmp_path / "kit")
    theirs = hf.PeftModel.from_pretrained(tiny_moe(kind), str(tmp_path / "kit"))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)
    theirs = hf.get_peft_model(tiny_moe(kind), hf.LoraConfig(**kw))
    randomize_adapters(theirs, 1, std=0.3)
    theirs.save_pretrained(str(tmp_path / "hf"))
    ours_back = PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "hf")
    torch.testing.assert_close(_logits(ours_back, ids), _logits(theirs, ids), atol=1e-5, rtol=1e-5)
    assert _hf_keys(str(tmp_path / "kit")) == _hf_keys(str(tmp_path / "hf"))
