"""BitFit and partial fine-tuning: the property battery over every model kind they apply to, their
semantics (exact bias / block replacement), saved keys, and bad input."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from peftkit import (BitFitConfig, ConfigError, MergeError, PartialConfig, PeftkitError, PeftModel, TargetError,
                     get_peft_model)
from peftkit.inject import AdapterLayer

from . import adapter_battery as B
from .models import CNN, MLP, randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

BIASLESS = ("llama", "t5", "stories260k")  # built without biases: BitFit raises (test_no_bias_to_train)


def _bitfit(case):
    return None if case.name in BIASLESS else BitFitConfig(task_type=case.task_type)


def _partial(case):
    if case.name == "mlp":
        return PartialConfig(target_modules=["lin1"])
    if case.name == "cnn":
        return PartialConfig(target_modules=["conv2d", "head"])
    return PartialConfig(num_last_layers=1, task_type=case.task_type)


BITFIT = B.Spec("bitfit", _bitfit, markers=("bitfit_bias",))
PARTIAL = B.Spec("partial", _partial, markers=("partial_layers",))
BITFIT_CASES = B.case_params(["mlp", "cnn", "gpt2", "bert"])
PARTIAL_CASES = B.case_params(slow=("stories260k",))
SPECS = {"bitfit": (BITFIT, BITFIT_CASES), "partial": (PARTIAL, PARTIAL_CASES)}
BATTERY = [pytest.param(SPECS[m][0], p.values[0], id=f"{m}-{p.id}", marks=p.marks) for m in SPECS for p in SPECS[m][1]]
battery = pytest.mark.parametrize("spec,case", BATTERY)


@battery
def test_noop_start(spec, case):
    B.check_noop_start(spec, case)


@battery
def test_only_selected_tensors_train(spec, case):
    B.check_only_adapter_trains(spec, case)


@battery
def test_merge_unmerge_and_unload_exact(spec, case):
    B.check_merge(spec, case)


@battery
def test_disable_adapter_gives_base_output(spec, case):
    B.check_disable(spec, case)


@battery
def test_save_load_exact(spec, case, tmp_path):
    saved = B.check_save_load(spec, case, tmp_path)
    base = B.build(case)
    model_keys = {k: v.shape for k, v in base.state_dict().items()}
    # the file holds the model's own keys (a subset of its state dict), with the model's shapes
    for key, tensor in saved.items():
        own = key.removeprefix("base_model.model.")
        assert own in model_keys and model_keys[own] == tensor.shape, key
        if spec is BITFIT and "classifier" not in key:
            assert own.endswith(".bias")


@pytest.mark.parametrize("spec,case", [(BITFIT, B.CASES[0]), (PARTIAL, B.CASES[2])], ids=["bitfit-mlp", "partial-llama"])
def test_load_validates_shapes(spec, case, tmp_path):
    B.check_load_validates_shapes(spec, case, tmp_path)


@battery
def test_several_adapters_and_delete(spec, case):
    B.check_several_adapters(spec, case)


@pytest.mark.parametrize("spec,case", [p for p in BATTERY if p.values[0] is BITFIT or p.values[1].name in ("mlp", "cnn")],
                         ids=lambda v: getattr(v, "name", None))
def test_mixed_batch_rows_equal_single_adapter_runs(spec, case):
    B.check_mixed_batch(spec, case)


# ---------------------------------------------------------------------------------------------
# BitFit semantics


def test_bitfit_output_is_the_model_with_the_tuned_biases():
    torch.manual_seed(0)
    base = MLP().eval()
    pm = get_peft_model(copy.deepcopy(base), BitFitConfig())
    randomize_adapters(pm, std=0.5, is_adapter=BITFIT.is_adapter)
    x = torch.randn(4, 10)
    ref = copy.deepcopy(base)
    layers = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name in ("lin0", "lin1", "lin2"):
            getattr(ref, name).bias.copy_(layers[name].bitfit_bias["default"])
        assert torch.equal(pm(x), ref(x))  # exact: the tuned bias replaces the base bias


def test_bitfit_patterns_select_biases(tmp_path):
    model = tiny_bert_cls()
    pm = get_peft_model(model, BitFitConfig(target_modules=["query", "intermediate.dense"], task_type="SEQ_CLS"))
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad and "bitfit" in n)
    assert len(trainable) == 4 and all(("query" in n or "intermediate.dense" in n) for n in trainable)
    pm = get_peft_model(tiny_gpt2(), BitFitConfig(target_modules=r".*\.ln_\d", task_type="CAUSAL_LM"))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 4 * 16


def test_bitfit_several_active_adapters_add_their_deltas_and_merge():
    torch.manual_seed(0)
    base = MLP().eval()
    pm = get_peft_model(copy.deepcopy(base), BitFitConfig())
    pm.add_adapter("b", BitFitConfig())
    randomize_adapters(pm, std=0.5, is_adapter=BITFIT.is_adapter)
    x = torch.randn(4, 10)
    layers = dict(pm.base_model.model.named_modules())
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("lin0", "lin1", "lin2"):
            b0 = getattr(base, name).bias
            getattr(ref, name).bias.copy_(b0 + (layers[name].bitfit_bias["default"] - b0)
                                          + (layers[name].bitfit_bias["b"] - b0))
    pm.set_adapter(["default", "b"])
    with torch.no_grad():
        both = pm(x)
        assert torch.allclose(both, ref(x), atol=1e-6)
        pm.merge_adapter()
        assert torch.allclose(pm(x), both, atol=1e-6)
        pm.unmerge_adapter()
        assert torch.equal(pm.base_model.model.lin0.get_base_layer().bias, base.lin0.bias)  # exact restore


def test_bitfit_no_bias_to_train():
    for build in (tiny_llama, tiny_t5):
        model = build()
        with pytest.raises(TargetError, match="no bias to train"):
            get_peft_model(model, BitFitConfig())
        assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    with pytest.raises(TargetError, match="have no bias parameter"):
        get_peft_model(MLP(bias=False), BitFitConfig(target_modules=["lin0"]))
    with pytest.raises(TargetError, match="No module of the model matched"):
        get_peft_model(MLP(), BitFitConfig(target_modules=["nothing"]))
    with pytest.raises(ConfigError):
        BitFitConfig(target_modules=[])


# ---------------------------------------------------------------------------------------------
# partial fine-tuning semantics


def test_partial_targets_last_blocks_of_every_stack():
    pm = get_peft_model(tiny_t5(), PartialConfig(num_last_layers=1, task_type="SEQ_2_SEQ_LM"))
    wrapped = sorted(k.removeprefix("base_model.model.") for k, m in pm.named_modules() if isinstance(m, AdapterLayer))
    assert wrapped == ["decoder.block.1", "encoder.block.1"]
    pm = get_peft_model(tiny_llama(), PartialConfig(num_last_layers=2, target_modules=["model.norm", "lm_head"],
                                                    task_type="CAUSAL_LM"))
    wrapped = sorted(k.removeprefix("base_model.model.") for k, m in pm.named_modules() if isinstance(m, AdapterLayer))
    assert wrapped == ["lm_head", "model.layers.0", "model.layers.1", "model.norm"]


def test_partial_saved_adapter_is_a_state_dict_subset(tmp_path):
    base = tiny_gpt2()
    pm = get_peft_model(copy.deepcopy(base), PartialConfig(num_last_layers=1, task_type="CAUSAL_LM"))
    randomize_adapters(pm, is_adapter=PARTIAL.is_adapter)
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = {k.removeprefix("base_model.model."): v for k, v in
               load_file(os.path.join(tmp_path, "adapter_model.safetensors")).items()}
    assert all(k.startswith("transformer.h.1.") for k in tensors)
    plain = copy.deepcopy(base)
    missing, unexpected = plain.load_state_dict(tensors, strict=False)
    assert not unexpected
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-6)


def test_partial_merge_one_adapter_at_a_time():
    pm = get_peft_model(MLP(), PartialConfig(target_modules=["lin1"]))
    pm.add_adapter("b", PartialConfig(target_modules=["lin1"]))
    pm.set_adapter(["default", "b"])
    with pytest.raises(PeftkitError, match="only one can be active"):
        pm(torch.randn(2, 10))
    with pytest.raises(MergeError, match="one can be merged"):
        pm.merge_adapter()


def test_partial_mixed_batch_of_blocks_raises_clearly():
    pm = get_peft_model(tiny_llama(), PartialConfig(num_last_layers=1, task_type="CAUSAL_LM"))
    pm.add_adapter("b", PartialConfig(num_last_layers=1, task_type="CAUSAL_LM"))
    with pytest.raises(PeftkitError, match="Mixed-adapter batches are not supported"):
        pm(input_ids=torch.randint(3, 64, (2, 5)), adapter_names=["default", "b"])


def test_partial_bad_input():
    with pytest.raises(TargetError, match="has only 2 blocks"):
        get_peft_model(tiny_llama(), PartialConfig(num_last_layers=3, task_type="CAUSAL_LM"))
    model = MLP()
    with pytest.raises(TargetError, match="no list of transformer blocks"):
        get_peft_model(model, PartialConfig(num_last_layers=1))
    with pytest.raises(TargetError, match="No module of the model matched"):
        get_peft_model(model, PartialConfig(target_modules=["lin9"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    with pytest.raises(ConfigError, match="num_last_layers"):
        PartialConfig()
    with pytest.raises(ConfigError, match="num_last_layers"):
        PartialConfig(num_last_layers=0)


def test_partial_on_cnn_trains_only_the_copy_and_loads(tmp_path):
    model = CNN().eval()
    pm = get_peft_model(copy.deepcopy(model), PartialConfig(target_modules=["conv2d"]))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        "base_model.model.conv2d.partial_layers.default.weight", "base_model.model.conv2d.partial_layers.default.bias"}
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert isinstance(loaded.base_model.model.conv2d, AdapterLayer)
