"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): the property battery over every model kind,
their placement and math, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peftkit import BottleneckConfig, ConfigError, PeftkitError, TargetError, get_peft_model
from peftkit.inject import AdapterLayer
from peftkit.methods.bottleneck import BottleneckLayer

from . import adapter_battery as B
from .models import MLP, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

MLP_PLACEMENT = {
    "houlsby": dict(attention_output_modules=["lin0"], ffn_output_modules=["lin1"]),
    "pfeiffer": dict(ffn_output_modules=["lin1"]),
    "parallel": dict(parallel_modules=["lin1"]),
}


def _spec(style: str, **extra) -> B.Spec:
    def config(case):
        if case.name == "cnn":
            return None  # no linear blocks to place adapters in
        kw = MLP_PLACEMENT[style] if case.name == "mlp" else {}
        return BottleneckConfig(style=style, bottleneck_size=4, task_type=case.task_type, **kw, **extra)

    return B.Spec(f"bottleneck-{style}", config, markers=("adapter_down", "adapter_up", "adapter_ln"),
                  mergeable=False, second=lambda c: c.replace(bottleneck_size=2))


SPECS = {
    "houlsby": _spec("houlsby"),
    "pfeiffer": _spec("pfeiffer", use_layer_norm=True),
    "parallel": _spec("parallel", non_linearity="gelu"),
}
CASES = B.case_params(["mlp", "llama", "gpt2", "bert", "t5", "stories260k"], slow=("stories260k",))
STYLES = pytest.mark.parametrize("style", list(SPECS))


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_noop_start(style, case):
    B.check_noop_start(SPECS[style], case)


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_only_adapters_train(style, case):
    B.check_only_adapter_trains(SPECS[style], case)


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_not_mergeable_clear_error_and_unload(style, case):
    B.check_merge(SPECS[style], case)


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_base_output(style, case):
    B.check_disable(SPECS[style], case)


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_save_load_exact_and_only_adapters_saved(style, case, tmp_path):
    saved = B.check_save_load(SPECS[style], case, tmp_path)
    assert all(".adapter_" in k or "classifier" in k for k in saved)


@pytest.mark.parametrize("case", B.case_params(["mlp", "llama"]))
def test_load_validates_shapes(case, tmp_path):
    B.check_load_validates_shapes(SPECS["houlsby"], case, tmp_path)


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_several_adapters_and_delete(style, case):
    B.check_several_adapters(SPECS[style], case)


@STYLES
@pytest.mark.parametrize("case", CASES)
def test_mixed_batch_rows_equal_single_adapter_runs(style, case):
    B.check_mixed_batch(SPECS[style], case)


def test_mixed_batch_adapters_with_and_without_layer_norm():
    spec = B.Spec("mix", lambda c: BottleneckConfig(style="pfeiffer", bottleneck_size=4, task_type=c.task_type),
                  markers=SPECS["houlsby"].markers,
                  second=lambda c: c.replace(use_layer_norm=True, bottleneck_size=3, scaling=0.5))
    B.check_mixed_batch(spec, next(c for c in B.CASES if c.name == "llama"))


# ---------------------------------------------------------------------------------------------
# placement


def _wrapped(pm):
    return {k.removeprefix("base_model.model."): m.placement for k, m in pm.named_modules()
            if isinstance(m, BottleneckLayer)}


def test_default_placement_llama():
    for style, expected in {
        "houlsby": {f"model.layers.{i}.{n}": "output" for i in range(2) for n in ("self_attn.o_proj", "mlp.down_proj")},
        "pfeiffer": {f"model.layers.{i}.mlp.down_proj": "output" for i in range(2)},
        "parallel": {f"model.layers.{i}.mlp": "input" for i in range(2)},
    }.items():
        pm = get_peft_model(tiny_llama(), BottleneckConfig(style=style, task_type="CAUSAL_LM"))
        assert _wrapped(pm) == expected, style


def test_default_placement_gpt2_bert_t5():
    pm = get_peft_model(tiny_gpt2(), BottleneckConfig(task_type="CAUSAL_LM"))
    assert set(_wrapped(pm)) == {f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_proj", "mlp.c_proj")}
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(task_type="SEQ_CLS"))
    assert set(_wrapped(pm)) == {f"bert.encoder.layer.{i}.{n}" for i in range(2)
                                 for n in ("attention.output.dense", "output.dense")}
    pm = get_peft_model(tiny_bert_cls(), BottleneckConfig(style="parallel", task_type="SEQ_CLS"))
    assert _wrapped(pm) == {f"bert.encoder.layer.{i}.output": "residual" for i in range(2)}
    pm = get_peft_model(tiny_t5(), BottleneckConfig(style="pfeiffer", task_type="SEQ_2_SEQ_LM"))
    assert set(_wrapped(pm)) == {f"{s}.block.{i}.layer.{j}.DenseReluDense.wo" for s, j in (("encoder", 1), ("decoder", 2))
                                 for i in range(2)}


def test_bottleneck_size_from_reduction_factor_and_trainable_count(capsys):
    pm = get_peft_model(tiny_llama(), BottleneckConfig(style="pfeiffer", reduction_factor=4, task_type="CAUSAL_LM"))
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert (layer.adapter_down["default"].in_features, layer.adapter_down["default"].out_features) == (16, 4)
    pm.print_trainable_parameters()
    per_layer = 16 * 4 + 4 + 4 * 16 + 16
    assert f"trainable params: {2 * per_layer:,d}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the math, pinned


def _set_random(layer, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (layer.adapter_down[name], layer.adapter_up[name]):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)


def _adapter(layer, h, name="default"):
    d, u = layer.adapter_down[name], layer.adapter_up[name]
    return F.linear(torch.relu(F.linear(h, d.weight, d.bias)), u.weight, u.bias)


def test_math_houlsby_on_mlp():
    torch.manual_seed(0)
    base = MLP().eval()
    pm = get_peft_model(copy.deepcopy(base), BottleneckConfig(bottleneck_size=3, **MLP_PLACEMENT["houlsby"]))
    l0, l1 = pm.base_model.model.lin0, pm.base_model.model.lin1
    _set_random(l0, seed=1)
    _set_random(l1, seed=2)
    x = torch.randn(4, 10)
    h = base.lin0(x)
    h = torch.relu(h + _adapter(l0, h))
    h = base.lin1(h)
    h = torch.relu(h + _adapter(l1, h))
    with torch.no_grad():
        assert torch.allclose(pm(x), base.lin2(h), atol=1e-6)


def test_math_parallel_on_mlp_default_scaling_4():
    torch.manual_seed(0)
    base = MLP().eval()
    pm = get_peft_model(copy.deepcopy(base), BottleneckConfig(style="parallel", bottleneck_size=3,
                                                              **MLP_PLACEMENT["parallel"]))
    l1 = pm.base_model.model.lin1
    assert l1.adapter_scaling["default"] == 4.0
    _set_random(l1, seed=3)
    x = torch.randn(4, 10)
    h = torch.relu(base.lin0(x))
    h = torch.relu(base.lin1(h) + 4.0 * _adapter(l1, h))
    with torch.no_grad():
        assert torch.allclose(pm(x), base.lin2(h), atol=1e-6)


def test_math_parallel_residual_on_bert_output():
    """BertOutput(h, r) = LN(dense(h) + r); the parallel adapter gives LN(dense(h) + r + s·A(r))."""
    base = tiny_bert_cls()
    pm = get_peft_model(copy.deepcopy(base), BottleneckConfig(style="parallel", bottleneck_size=4, scaling=2.0,
                                                              task_type="SEQ_CLS"))
    wrapped = pm.base_model.model.bert.encoder.layer[0].output
    orig = base.bert.encoder.layer[0].output
    _set_random(wrapped, seed=4)
    h, r = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = orig.LayerNorm(orig.dense(h) + r + 2.0 * _adapter(wrapped, r))
        assert torch.allclose(wrapped(h, r), expected, atol=1e-6)


def test_layer_norm_and_non_linearity_options():
    torch.manual_seed(0)
    base = MLP().eval()
    pm = get_peft_model(copy.deepcopy(base), BottleneckConfig(style="pfeiffer", bottleneck_size=3, use_layer_norm=True,
                                                              non_linearity="tanh", scaling=0.5,
                                                              **MLP_PLACEMENT["pfeiffer"]))
    l1 = pm.base_model.model.lin1
    _set_random(l1, seed=5)
    ln, d, u = l1.adapter_ln["default"], l1.adapter_down["default"], l1.adapter_up["default"]
    x = torch.randn(4, 10)
    h = base.lin1(torch.relu(base.lin0(x)))
    h = torch.relu(h + 0.5 * u(torch.tanh(d(ln(h)))))
    with torch.no_grad():
        assert torch.allclose(pm(x), base.lin2(h), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input


def test_reduction_larger_than_hidden_size_raises_before_changing_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="larger than the hidden size 16"):
        get_peft_model(model, BottleneckConfig(reduction_factor=32, task_type="CAUSAL_LM"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_model_needs_placement():
    model = MLP()
    with pytest.raises(ConfigError, match="attention_output_modules and ffn_output_modules"):
        get_peft_model(model, BottleneckConfig())
    with pytest.raises(TargetError, match="parallel_modules"):
        get_peft_model(model, BottleneckConfig(style="parallel", parallel_modules=["nothing_here"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_parallel_block_with_different_in_and_out_sizes_raises():
    with pytest.raises(TargetError, match="input and output sizes"):
        get_peft_model(MLP(), BottleneckConfig(style="parallel", parallel_modules=["lin0"]))


@pytest.mark.parametrize("kw", [dict(reduction_factor=0), dict(bottleneck_size=0), dict(adapter_dropout=1.0),
                                dict(non_linearity="softplus"), dict(style="sequential"),
                                dict(parallel_input="residual"), dict(scaling=float("nan"))])
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        BottleneckConfig(**kw)


def test_merge_error_says_why():
    pm = get_peft_model(MLP(), BottleneckConfig(bottleneck_size=2, **MLP_PLACEMENT["houlsby"]))
    with pytest.raises(PeftkitError, match="non-linearity"):
        pm.merge_adapter()
    with pytest.raises(PeftkitError, match="unload"):
        pm.merge_and_unload()
