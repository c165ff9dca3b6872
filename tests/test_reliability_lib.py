"""Issue 16, the library's causes: every bad input raises a PeftkitError that says what is wrong, before
the model changes; nothing is left half-done; results are right or refused.

Each test feeds the bad input, checks the error (or the correct result), and checks that the model
(every tensor of its state dict bit for bit, the adapter registry, the layers) is unchanged. The last
part is a table over every public mutating call of PeftModel (test_bad_call_changes_nothing).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import peftkit
from peftkit import (
    AdapterNameError,
    AutoPeftModel,
    BottleneckConfig,
    CheckpointError,
    ConfigError,
    IA3Config,
    LoraConfig,
    MergeError,
    PeftConfig,
    PeftkitError,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TargetError,
    get_peft_model,
    set_peft_model_state_dict,
)
from peftkit.core import AdapterLayer
from peftkit.methods.lora import combine

from .models import MLP, bundled, randomize_adapters, tiny_llama, tiny_t5

LORA = dict(target_modules=["lin0", "lin1", "lin2"])


# ---------------------------------------------------------------------------------------------
# what "unchanged" means


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (so that NaN compares equal to the same NaN)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model: nn.Module) -> dict:
    """Every tensor of the state dict (copied), the adapter registry, the active adapters, the layers."""
    return {
        "tensors": {k: (v.dtype, tuple(v.shape), _bits(v).clone()) for k, v in model.state_dict().items()},
        "registry": {n: c.to_dict() for n, c in model.peft_config.items()} if isinstance(model, PeftModel) else {},
        "active": model.active_adapters if isinstance(model, PeftModel) else [],
        "layers": [(k, type(m).__name__) for k, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["layers"] == before["layers"]
    assert after["registry"] == before["registry"]
    assert after["active"] == before["active"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, (dtype, shape, data) in before["tensors"].items():
        dtype2, shape2, data2 = after["tensors"][key]
        assert (dtype2, shape2) == (dtype, shape) and torch.equal(data2, data), key


def two_adapters(seed: int = 0) -> PeftModel:
    """An MLP with adapters "default" (active) and "other", both non-zero."""
    torch.manual_seed(seed)
    pm = get_peft_model(MLP(), LoraConfig(**LORA))
    pm.add_adapter("other", LoraConfig(**LORA, r=4))
    randomize_adapters(pm, seed=seed)
    return pm


def poison_last_layer(pm: PeftModel, name: str = "default") -> None:
    """A NaN in the adapter of the last targeted layer only (merging the others would work)."""
    with torch.no_grad():
        pm.base_model.model.lin2.lora_B[name].weight[0, 0] = float("nan")


# ---------------------------------------------------------------------------------------------
# 1. PiSSA rewrites base weights: a later error puts them back


class LinearThenEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.emb = nn.Embedding(10, 6)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_then_unknown_modules_to_save_leaves_base_weights(init):
    model = MLP()
    before = snapshot(model)
    with pytest.raises(TargetError, match="modules_to_save"):
        get_peft_model(model, LoraConfig(**LORA, r=2, init_lora_weights=init, modules_to_save=["nope"]))
    assert_unchanged(model, before)


def test_pissa_then_a_target_it_cannot_init_leaves_base_weights():
    model = LinearThenEmbedding()
    before = snapshot(model)
    with pytest.raises(TargetError, match="PiSSA"):  # lin is rewritten first, then emb fails
        get_peft_model(model, LoraConfig(target_modules=["lin", "emb"], r=2, init_lora_weights="pissa"))
    assert_unchanged(model, before)


def test_pissa_adapter_that_fails_to_load_leaves_base_weights(tmp_path):
    pm = get_peft_model(MLP(), LoraConfig(**LORA, r=2, init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path)
    weights = peftkit.load_peft_weights(tmp_path)
    key = next(k for k in weights if "lin2.lora_B" in k)
    weights[key] = torch.zeros(3, 3)  # the last tensor does not fit
    from safetensors.torch import save_file

    save_file(weights, os.path.join(tmp_path, "adapter_model.safetensors"))
    model = MLP()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="lin2.lora_B"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_unchanged(model, before)
    host = two_adapters()
    before = snapshot(host)
    with pytest.raises(CheckpointError, match="lin2.lora_B"):
        host.load_adapter(tmp_path, "pissa")
    assert_unchanged(host, before)


# ---------------------------------------------------------------------------------------------
# 2. safe_merge checks every layer before the first write


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_with_nan_in_the_last_layer_merges_nothing(call):
    pm = two_adapters()
    poison_last_layer(pm)
    before = snapshot(pm)
    with pytest.raises(MergeError, match="lin2.*Nothing was merged"):
        getattr(pm, call)(safe_merge=True)
    assert_unchanged(pm, before)
    assert not any(layer.merged for _, layer in pm._layers())


def test_safe_merge_sees_an_overflow_of_the_base_dtype():
    """W + ΔW finite in float32 but not in the float16 base: found before anything is written."""
    model = MLP().half()
    pm = get_peft_model(model, LoraConfig(**LORA))
    randomize_adapters(pm)
    with torch.no_grad():
        pm.base_model.model.lin2.lora_B["default"].weight.fill_(1e6)
    before = snapshot(pm)
    with pytest.raises(MergeError, match="lin2"):
        pm.merge_adapter(safe_merge=True)
    assert_unchanged(pm, before)


def test_safe_merge_of_ia3_and_dora_checks_every_layer_first():
    for config, poison in [
        (IA3Config(target_modules=["lin0", "lin2"], feedforward_modules=[]), "ia3_l"),
        (LoraConfig(**LORA, use_dora=True), "lora_B"),
    ]:
        pm = get_peft_model(MLP(), config)
        randomize_adapters(pm)
        with torch.no_grad():
            param = getattr(pm.base_model.model.lin2, poison)["default"]
            (param if isinstance(param, nn.Parameter) else param.weight).view(-1)[0] = float("inf")
        before = snapshot(pm)
        with pytest.raises(MergeError, match="lin2"):
            pm.merge_and_unload(safe_merge=True)
        assert_unchanged(pm, before)


def test_failed_merge_of_a_quantized_model_puts_the_quantized_layers_back():
    from peftkit.quant import quantize_model

    model = quantize_model(MLP(), bits=8)
    pm = get_peft_model(model, LoraConfig(target_modules=["lin0", "lin1"]))
    randomize_adapters(pm)
    with torch.no_grad():
        pm.base_model.model.lin1.lora_A["default"].weight[0, 0] = float("nan")
    before = snapshot(pm)
    with pytest.raises(MergeError, match="lin1"):
        pm.merge_and_unload(safe_merge=True, dequantize=True)
    assert_unchanged(pm, before)
    assert hasattr(pm.get_base_model(), "peftkit_quantization")


def test_merging_is_still_exact_and_reversible():
    pm = two_adapters()
    x = torch.randn(4, 10)
    with torch.no_grad():
        ref = pm(x)
        pm.merge_adapter(["default", "other"], safe_merge=True)
        pm.set_adapter(["default", "other"])
        both = pm(x)
        pm.unmerge_adapter()
        pm.set_adapter("default")
        assert torch.allclose(pm(x), ref, atol=1e-6)
        merged = pm.merge_and_unload(safe_merge=True)
        assert torch.allclose(merged(x), ref, atol=1e-5)
    assert not torch.allclose(both, ref)


# ---------------------------------------------------------------------------------------------
# 3, 4. a second PeftModel on a base that already holds one: refused


def test_from_pretrained_onto_a_peft_model_is_refused(tmp_path):
    pm = two_adapters()
    pm.save_pretrained(tmp_path)
    before = snapshot(pm)
    with pytest.raises(PeftkitError, match="already a PeftModel.*load_adapter"):
        PeftModel.from_pretrained(pm, tmp_path)
    with pytest.raises(PeftkitError, match="already holds adapter layers"):
        PeftModel.from_pretrained(pm.get_base_model(), tmp_path)
    assert_unchanged(pm, before)
    pm.load_adapter(tmp_path, "again")  # what to do instead
    assert "again" in pm.peft_config


def test_get_peft_model_twice_on_one_base_is_refused():
    model = MLP()
    first = get_peft_model(model, LoraConfig(**LORA))
    randomize_adapters(first)
    before = snapshot(first)
    with pytest.raises(PeftkitError, match="add_adapter / load_adapter"):
        get_peft_model(model, LoraConfig(**LORA))
    with pytest.raises(PeftkitError, match="already a PeftModel"):
        get_peft_model(first, LoraConfig(**LORA))
    assert_unchanged(first, before)
    get_peft_model(first.unload(), LoraConfig(**LORA))  # a clean base again


# ---------------------------------------------------------------------------------------------
# 5. add_weighted_adapter: finite weights, all or nothing


@pytest.mark.parametrize("weights", [[float("nan")], [float("inf")], [-float("inf")], ["1.0"], [None]])
@pytest.mark.parametrize("combination_type", ["svd", "cat", "linear"])
def test_weighted_adapter_with_a_bad_weight_adds_nothing(weights, combination_type):
    pm = two_adapters()
    before = snapshot(pm)
    with pytest.raises(PeftkitError, match="weights"):
        pm.add_weighted_adapter(["default"], weights, "mix", combination_type=combination_type)
    assert_unchanged(pm, before)


def test_weighted_adapter_failing_after_creation_is_removed(monkeypatch):
    pm = two_adapters()
    before = snapshot(pm)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(combine, "combine_layer", broken)
    with pytest.raises(RuntimeError, match="boom"):
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    assert_unchanged(pm, before)


def test_weighted_adapter_of_a_broken_adapter_is_a_clear_error():
    pm = two_adapters()
    poison_last_layer(pm, "other")
    before = snapshot(pm)
    with pytest.raises(PeftkitError, match="NaN/inf"):
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="svd")
    with pytest.raises(PeftkitError, match="svd_clamp"):
        pm.add_weighted_adapter(["default"], [1.0], "mix", svd_clamp=2.0)
    assert_unchanged(pm, before)


# ---------------------------------------------------------------------------------------------
# 6. LoRA on a tied lm_head: merging is exact


@pytest.fixture(scope="module")
def tied_inputs():
    return torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]])
def test_merging_into_tied_embeddings_is_exact(targets, tied_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = bundled()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the bundled model ties them
    embeddings = model.model.embed_tokens.weight.detach().clone()
    pm = get_peft_model(model, LoraConfig(target_modules=targets, r=4))
    randomize_adapters(pm, std=0.3)
    with torch.no_grad():
        ref = pm(input_ids=tied_inputs).logits
        with pytest.warns(peftkit.PeftkitWarning, match="tied embeddings"):
            pm.merge_adapter()
        assert torch.allclose(pm(input_ids=tied_inputs).logits, ref, atol=1e-4)
        pm.unmerge_adapter()
        assert torch.allclose(pm(input_ids=tied_inputs).logits, ref, atol=1e-4)
        merged = pm.merge_and_unload(safe_merge=True)
        assert torch.allclose(merged(input_ids=tied_inputs).logits, ref, atol=1e-4)
    if targets == ["lm_head"]:
        assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=tied_inputs).logits, ref, atol=1e-4)


def test_a_trained_copy_of_a_tied_head_is_saved_apart(tied_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(bundled(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(pm, is_adapter=lambda n: "lora_" in n or "modules_to_save" in n)
    with torch.no_grad():
        ref = pm(input_ids=tied_inputs).logits
        merged = pm.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.allclose(reloaded(input_ids=tied_inputs).logits, ref, atol=1e-4)


def test_merging_elsewhere_keeps_embeddings_tied(tied_inputs):
    model = bundled()
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=4))
    randomize_adapters(pm)
    merged = pm.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is True


# ---------------------------------------------------------------------------------------------
# 7. mixed batches: one name per row in forward; generate may expand rows


def test_mixed_batch_needs_one_name_per_row():
    pm = two_adapters()
    x = torch.randn(2, 10)
    with pytest.raises(PeftkitError, match="1 entries but the batch has 2 rows"):
        pm(x, adapter_names=["default"])
    with pytest.raises(PeftkitError, match="empty"):
        pm(x, adapter_names=[])
    with pytest.raises(PeftkitError, match="3 entries but the batch has 2 rows"):
        pm(x, adapter_names=["default", "other", "__base__"])
    assert pm(x, adapter_names=["default", "other"]).shape == (2, 2)


def test_mixed_batch_rows_are_checked_in_every_layer():
    """A batch whose rows only a layer sees (positional input of another name) is still checked there."""
    pm = two_adapters()
    with pytest.raises(PeftkitError, match="1 entries but the batch has 2 rows"):
        pm(x=torch.randn(2, 10), adapter_names=["default"])


def test_generate_expands_rows_for_beams_and_return_sequences():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    pm.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM"))
    randomize_adapters(pm, seed=3, std=0.5)
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    mixed = pm.generate(input_ids=ids, adapter_names=["b", "__base__"], **kw)
    assert mixed.shape[0] == 4
    pm.set_adapter("b")
    single = pm.generate(input_ids=ids[:1], **kw)
    with pm.disable_adapter():
        base = pm.generate(input_ids=ids[1:], **kw)
    assert torch.equal(mixed[:2, : single.shape[1]], single)
    assert torch.equal(mixed[2:, : base.shape[1]], base)
    with pytest.raises(PeftkitError, match="empty"):
        pm.generate(input_ids=ids, adapter_names=[], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# 8. NaN / inf in configs (constructor and files)


@pytest.mark.parametrize("make", [
    lambda v: LoraConfig(lora_alpha=v),
    lambda v: LoraConfig(alpha_pattern={"lin0": v}),
    lambda v: LoraConfig(lora_dropout=v),
    lambda v: BottleneckConfig(scaling=v),
    lambda v: BottleneckConfig(adapter_dropout=v),
    lambda v: PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=v),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_config_values_are_refused(make, value):
    with pytest.raises(ConfigError, match="finite|must be in"):
        make(value)


@pytest.mark.parametrize("field, value", [("lora_alpha", "NaN"), ("lora_alpha", "Infinity"),
                                          ("alpha_pattern", '{"lin0": -Infinity}'), ("rank_pattern", '{"lin0": NaN}')])
def test_non_finite_values_in_a_config_file_are_refused(tmp_path, field, value):
    text = LoraConfig(**LORA).to_json_string()
    data = json.loads(text)
    data.pop(field)
    text = json.dumps(data)[:-1] + f', "{field}": {value}}}'
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError, match=field):
        PeftConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# 9. adapter names are plain


BAD_NAMES = ["/tmp/abs", "../up", "a/b", "a\\b", "a\x00b", ".", "..", "a.b", "", "a b", "x" * 200, None, 5, "__base__"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_adapter_names_are_refused_everywhere(name, tmp_path):
    pm = two_adapters()
    pm.save_pretrained(tmp_path / "saved")
    before = snapshot(pm)
    with pytest.raises(AdapterNameError, match="not valid|must be a string"):
        pm.add_adapter(name, LoraConfig(**LORA))
    with pytest.raises(AdapterNameError, match="not valid|must be a string"):
        pm.load_adapter(tmp_path / "saved", name)
    with pytest.raises(AdapterNameError, match="not valid|must be a string"):
        pm.add_weighted_adapter(["default"], [1.0], name)
    assert_unchanged(pm, before)
    model = MLP()
    base_before = snapshot(model)
    with pytest.raises(AdapterNameError, match="not valid|must be a string"):
        get_peft_model(model, LoraConfig(**LORA), adapter_name=name)
    with pytest.raises(AdapterNameError, match="not valid|must be a string"):
        PeftModel.from_pretrained(model, tmp_path / "saved", adapter_name=name)
    assert_unchanged(model, base_before)


def test_save_pretrained_never_writes_outside_its_folder(tmp_path):
    pm = two_adapters()
    pm.peft_config["../escaped"] = pm.peft_config.pop("other")  # a name set behind the API's back
    with pytest.raises(AdapterNameError, match="not valid"):
        pm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "out").exists()


def test_plain_names_still_work(tmp_path):
    pm = two_adapters()
    for name in ("my-adapter_2", "Ünïcode", "A"):
        pm.add_adapter(name, LoraConfig(**LORA))
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "my-adapter_2" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------
# 10. absurd sizes: a ConfigError before allocating


@pytest.mark.parametrize("build, config, match", [
    (MLP, LoraConfig(**LORA, r=2**40), "lin0: LoRA r=1099511627776 needs a tensor"),
    (MLP, LoraConfig(**LORA, rank_pattern={"lin1": 2**35}), "lin1: LoRA r=34359738368"),
    (tiny_llama, PromptTuningConfig(num_virtual_tokens=10**7, task_type="CAUSAL_LM"), "more than the model's context"),
    (tiny_llama, PrefixTuningConfig(num_virtual_tokens=10**7, task_type="CAUSAL_LM"), "more than the model's context"),
    (tiny_t5, PromptTuningConfig(num_virtual_tokens=10**9, task_type="SEQ_2_SEQ_LM"), "num_virtual_tokens"),
    (tiny_llama, PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=10**6, task_type="CAUSAL_LM"),
     "encoder_hidden_size"),
    (tiny_llama, BottleneckConfig(bottleneck_size=10**10), "bottleneck_size"),
], ids=["lora-r", "rank-pattern", "prompt-context", "prefix-context", "prompt-t5", "p-tuning", "bottleneck"])
def test_absurd_sizes_are_refused_before_allocating(build, config, match):
    model = build()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, config)
    assert_unchanged(model, before)


def test_an_adapter_larger_than_free_memory_is_refused(monkeypatch):
    from peftkit.core import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**20)
    pm = two_adapters()
    before = snapshot(pm)
    with pytest.raises(ConfigError, match="free"):
        pm.add_adapter("huge", LoraConfig(**LORA, r=2**20))  # 2**20 * 30 floats: over CHECK_FREE_ABOVE
    assert_unchanged(pm, before)


# ---------------------------------------------------------------------------------------------
# 11. invalid regexes: ConfigError naming the field, at construction


@pytest.mark.parametrize("make, field", [
    (lambda: LoraConfig(target_modules="(["), "target_modules"),
    (lambda: LoraConfig(exclude_modules="*lin"), "exclude_modules"),
    (lambda: LoraConfig(rank_pattern={"lin(": 2}), "rank_pattern"),
    (lambda: LoraConfig(alpha_pattern={"[": 2}), "alpha_pattern"),
    (lambda: LoraConfig(layers_to_transform=[0], layers_pattern=["layers", "(?P<idx>x)"]), "layers_pattern"),
    (lambda: IA3Config(target_modules=["k"], feedforward_modules="k)"), "feedforward_modules"),
    (lambda: BottleneckConfig(ffn_output_modules="mlp["), "ffn_output_modules"),
    (lambda: PeftConfig.from_dict({"peft_type": "BITFIT", "target_modules": "+"}), "target_modules"),
])
def test_invalid_regexes_are_config_errors(make, field):
    with pytest.raises(ConfigError, match=f"{field}.*not a valid regular expression"):
        make()


def test_lists_of_names_are_not_regexes():
    LoraConfig(target_modules=["lin[0]"], exclude_modules=["a("])  # names, matched literally


# ---------------------------------------------------------------------------------------------
# 12. auto_mapping naming a class transformers does not have


@pytest.mark.parametrize("mapping", [
    {"base_model_class": "NoSuchModelForAnything", "parent_library": "transformers.models.llama"},
    {"base_model_class": ["LlamaModel"], "parent_library": "transformers"},
    {"base_model_class": "LlamaModel", "parent_library": 3},
    "not a dict",
])
def test_auto_peft_model_with_a_bad_auto_mapping(tmp_path, mapping):
    data = LoraConfig(target_modules=["q_proj"]).to_dict()
    data.update(base_model_name_or_path=str(peftkit.model_path()), auto_mapping=mapping)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(PeftkitError, match="base model|auto_mapping"):
        AutoPeftModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# 13. config JSON nested deeply


def test_deeply_nested_config_json(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "auto_mapping": ' + "[" * 100_000
                                                 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="too deeply"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "auto_mapping": {"a": ' + "[" * 200
                                                 + "]" * 200 + "}}")
    with pytest.raises(ConfigError, match="auto_mapping nests"):
        PeftConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# 14-17. clear errors instead of tracebacks


def test_active_peft_config_without_adapters():
    pm = two_adapters()
    pm.delete_adapter("default")
    pm.delete_adapter("other")
    with pytest.raises(AdapterNameError, match="no adapter"):
        pm.active_peft_config
    assert pm(torch.randn(2, 10)).shape == (2, 2)  # the base model runs
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    prompt.delete_adapter("default")
    with pytest.raises(AdapterNameError, match="no adapter"):
        prompt.active_peft_config
    with pytest.raises(AdapterNameError, match="no adapter"):
        prompt(input_ids=torch.tensor([[3, 4]]))


@pytest.mark.parametrize("state_dict, match", [
    ({"base_model.model.lin0.lora_A.weight": [[1.0] * 10] * 8}, "lin0.lora_A.weight.*list"),
    ({"base_model.model.lin0.lora_A.weight": None}, "lin0.lora_A.weight.*NoneType"),
    ({3: torch.zeros(1)}, "key 3"),
    (None, "expected a dict"),
    ([("base_model.model.lin0.lora_A.weight", torch.zeros(8, 10))], "expected a dict"),
])
def test_state_dict_of_non_tensors(state_dict, match):
    pm = two_adapters()
    before = snapshot(pm)
    with pytest.raises(CheckpointError, match=match):
        set_peft_model_state_dict(pm, state_dict)
    assert_unchanged(pm, before)


def test_save_pretrained_under_a_file(tmp_path):
    pm = two_adapters()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="Cannot create the folder"):
        pm.save_pretrained(tmp_path / "file" / "adapter")
    with pytest.raises(CheckpointError, match="is a file"):
        pm.save_pretrained(tmp_path / "file")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other").write_text("x")  # where the second adapter would go
    with pytest.raises(CheckpointError, match="is a file"):
        pm.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["other"]  # nothing written


@pytest.mark.parametrize("call", [
    lambda pm: pm.set_adapter(None),
    lambda pm: pm.set_adapter(3),
    lambda pm: pm.set_adapter([None]),
    lambda pm: pm.set_adapter([]),
    lambda pm: pm.delete_adapter(None),
    lambda pm: pm.delete_adapter(["other"]),
    lambda pm: pm.merge_adapter(adapter_names=5),
    lambda pm: pm.merge_and_unload(adapter_names=[1]),
    lambda pm: pm.save_pretrained("/tmp/unused", selected_adapters=7),
])
def test_wrong_types_of_adapter_names(call):
    pm = two_adapters()
    before = snapshot(pm)
    with pytest.raises(AdapterNameError):
        call(pm)
    assert_unchanged(pm, before)


def test_inject_adapter_in_model_is_all_or_nothing():
    model = MLP()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="lin0.lora_A.weight"):
        peftkit.inject_adapter_in_model(LoraConfig(**LORA), model, state_dict={"lin0.lora_A.weight": torch.zeros(1)})
    with pytest.raises(TargetError, match="modules_to_save"):
        peftkit.inject_adapter_in_model(LoraConfig(**LORA, init_lora_weights="pissa", r=2, modules_to_save=["x"]), model)
    with pytest.raises(AdapterNameError, match="not valid"):
        peftkit.inject_adapter_in_model(LoraConfig(**LORA), model, adapter_name="a/b")
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# 18. the general property: every public mutating call, given bad input, succeeds or changes nothing


def _folder(tmp_path, name="adapter", **overrides):
    """An adapter folder of the MLP (LoRA on lin0..lin2), with ``overrides`` written into its config."""
    pm = get_peft_model(MLP(), LoraConfig(**LORA))
    randomize_adapters(pm, seed=9)
    path = tmp_path / name
    pm.save_pretrained(path)
    if overrides:
        data = json.loads((path / "adapter_config.json").read_text())
        data.update(overrides)
        (path / "adapter_config.json").write_text(json.dumps(data))
    return path


def _misshapen(tmp_path, **config):
    """An adapter folder whose last tensor does not fit the MLP."""
    from safetensors.torch import load_file, save_file

    pm = get_peft_model(MLP(), LoraConfig(**LORA, **config))
    path = tmp_path / "misshapen"
    pm.save_pretrained(path)
    weights = load_file(path / "adapter_model.safetensors")
    weights[next(k for k in weights if "lin2" in k)] = torch.zeros(2, 2)
    save_file(weights, path / "adapter_model.safetensors")
    return path


def _setup(kind: str) -> PeftModel:
    """"two": adapters default (active) and other; "merged": other merged too; "nan" / "nan-other": a NaN
    in the last layer of default / other."""
    pm = two_adapters()
    if kind == "merged":
        pm.merge_adapter(["other"])
    elif kind.startswith("nan"):
        poison_last_layer(pm, "other" if kind == "nan-other" else "default")
    return pm


# (setup, bad call); every call must raise a PeftkitError and leave the model as it was
BAD_CALLS = {
    # add_adapter
    "add:existing-name": ("two", lambda pm, t: pm.add_adapter("other", LoraConfig(**LORA))),
    "add:path-name": ("two", lambda pm, t: pm.add_adapter("../x", LoraConfig(**LORA))),
    "add:not-a-config": ("two", lambda pm, t: pm.add_adapter("new", {"r": 8})),
    "add:no-target": ("two", lambda pm, t: pm.add_adapter("new", LoraConfig(target_modules=["nope"]))),
    "add:bad-modules-to-save": ("two", lambda pm, t: pm.add_adapter("new", LoraConfig(**LORA, modules_to_save=["x"]))),
    "add:pissa-then-error": ("merged", lambda pm, t: pm.add_adapter(
        "new", LoraConfig(target_modules=["lin1"], init_lora_weights="pissa", modules_to_save=["nope"]))),
    "add:huge-r": ("two", lambda pm, t: pm.add_adapter("new", LoraConfig(**LORA, r=2**40))),
    "add:bias": ("two", lambda pm, t: pm.add_adapter("new", LoraConfig(**LORA, bias="all"))),
    # set_adapter / delete_adapter
    "set:unknown": ("two", lambda pm, t: pm.set_adapter("nope")),
    "set:none": ("two", lambda pm, t: pm.set_adapter(None)),
    "set:empty": ("two", lambda pm, t: pm.set_adapter([])),
    "delete:unknown": ("two", lambda pm, t: pm.delete_adapter("nope")),
    "delete:list": ("two", lambda pm, t: pm.delete_adapter(["other"])),
    "delete:merged": ("merged", lambda pm, t: pm.delete_adapter("other")),
    # load_adapter
    "load:missing": ("two", lambda pm, t: pm.load_adapter(t / "missing", "new")),
    "load:existing-name": ("two", lambda pm, t: pm.load_adapter(_folder(t), "other")),
    "load:path-name": ("two", lambda pm, t: pm.load_adapter(_folder(t), "a/b")),
    "load:misshapen": ("merged", lambda pm, t: pm.load_adapter(_misshapen(t), "new")),
    "load:pissa-misshapen": ("merged", lambda pm, t: pm.load_adapter(_misshapen(t, r=2, init_lora_weights="pissa"), "new")),
    "load:nan-alpha": ("two", lambda pm, t: pm.load_adapter(_folder(t, lora_alpha=float("nan")), "new")),
    "load:bad-regex": ("two", lambda pm, t: pm.load_adapter(_folder(t, target_modules="(["), "new")),
    # merging
    "merge:unknown": ("two", lambda pm, t: pm.merge_adapter(["nope"])),
    "merge:names-type": ("two", lambda pm, t: pm.merge_adapter(5)),
    "merge:safe-nan": ("nan", lambda pm, t: pm.merge_adapter(safe_merge=True)),
    "merge:safe-nan-second": ("nan-other", lambda pm, t: pm.merge_adapter(["default", "other"], safe_merge=True)),
    "merge-and-unload:safe-nan": ("nan", lambda pm, t: pm.merge_and_unload(safe_merge=True)),
    "merge-and-unload:unknown": ("merged", lambda pm, t: pm.merge_and_unload(adapter_names=["nope"])),
    # add_weighted_adapter
    "weighted:nan": ("two", lambda pm, t: pm.add_weighted_adapter(["default", "other"], [1.0, float("nan")], "mix")),
    "weighted:inf": ("merged", lambda pm, t: pm.add_weighted_adapter(["default"], [float("inf")], "mix")),
    "weighted:unknown": ("two", lambda pm, t: pm.add_weighted_adapter(["nope"], [1.0], "mix")),
    "weighted:existing-name": ("two", lambda pm, t: pm.add_weighted_adapter(["default"], [1.0], "other")),
    "weighted:type": ("two", lambda pm, t: pm.add_weighted_adapter(["default"], [1.0], "mix", combination_type="x")),
    "weighted:lengths": ("two", lambda pm, t: pm.add_weighted_adapter(["default", "other"], [1.0], "mix")),
    "weighted:linear-ranks": ("two", lambda pm, t: pm.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix",
                                                                         combination_type="linear")),
    "weighted:svd-of-nan": ("nan-other", lambda pm, t: pm.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")),
    # set_peft_model_state_dict
    "state:none": ("two", lambda pm, t: set_peft_model_state_dict(pm, None)),
    "state:list-value": ("two", lambda pm, t: set_peft_model_state_dict(pm, {"base_model.model.lin0.lora_A.weight": [1]})),
    "state:misshapen": ("two", lambda pm, t: set_peft_model_state_dict(
        pm, {k: torch.zeros(1) for k in peftkit.get_peft_model_state_dict(pm)})),
    "state:other-model": ("two", lambda pm, t: set_peft_model_state_dict(pm, {"base_model.model.x.weight": torch.ones(1)})),
    "state:unknown-adapter": ("two", lambda pm, t: set_peft_model_state_dict(pm, {}, adapter_name="nope")),
    # from_pretrained with this model (or its base) as the base
    "from-pretrained:peft-model": ("merged", lambda pm, t: PeftModel.from_pretrained(pm, _folder(t))),
    "from-pretrained:its-base": ("two", lambda pm, t: PeftModel.from_pretrained(pm.get_base_model(), _folder(t))),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_changes_nothing(name, tmp_path):
    setup, call = BAD_CALLS[name]
    pm = _setup(setup)
    before = snapshot(pm)
    with pytest.raises(PeftkitError):
        call(pm, tmp_path)
    assert_unchanged(pm, before)


@pytest.mark.parametrize("setup", ["two", "merged"])
def test_good_calls_still_change_the_model(setup, tmp_path):
    """The table's calls, with good input, do their work (so the table is not passing by doing nothing)."""
    pm = _setup(setup)
    pm.unmerge_adapter()
    pm.add_adapter("new", LoraConfig(target_modules=["lin1"], init_lora_weights="pissa"))
    pm.load_adapter(_folder(tmp_path), "loaded")
    pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    pm.set_adapter(["default", "loaded"])
    before = snapshot(pm)
    pm.merge_adapter(safe_merge=True)
    with pytest.raises(AssertionError):
        assert_unchanged(pm, before)
    pm.unmerge_adapter()
    pm.delete_adapter("mix")
    assert set(pm.peft_config) == {"default", "other", "new", "loaded"}
    merged = pm.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
