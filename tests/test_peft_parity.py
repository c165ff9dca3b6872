"""Behaviours, names and the object model that code written against Hugging Face PEFT relies on
(issue 14): each test builds its models in-process and checks peftkit's own results."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import yaml
from torch import nn

import peftkit
from peftkit import (
    CheckpointError,
    ConfigError,
    IA3Config,
    LoraConfig,
    LoraModel,
    PeftConfig,
    PeftModel,
    PeftType,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

from .models import MLP, randomize_adapters, tiny_llama

X = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.drop(self.lin0(x)))


def _lora_mlp(seed: int = 0, **kw) -> PeftModel:
    torch.manual_seed(seed)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], **kw))
    randomize_adapters(pm, seed=seed)
    return pm


# -- the real bugs ------------------------------------------------------------------------------
def test_from_pretrained_for_inference_is_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(DropoutMLP(), LoraConfig(target_modules=["lin0"]))
    randomize_adapters(pm)
    pm.eval()
    expected = pm(X)
    pm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = DropoutMLP()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in pm.get_base_model().state_dict().items()
                          if "lora_" not in k})
    loaded = PeftModel.from_pretrained(base.train(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert torch.allclose(loaded(X), expected)
    trainable = PeftModel.from_pretrained(DropoutMLP().train(), tmp_path, is_trainable=True)
    assert trainable.training  # trainable: the mode is the user's


def test_load_adapter_returns_keys_and_sets_eval(tmp_path):
    pm = _lora_mlp()
    pm.save_pretrained(tmp_path)
    pm.train()
    result = pm.load_adapter(tmp_path, "other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not pm.training


def test_set_peft_model_state_dict_reports_missing_and_unexpected():
    pm = _lora_mlp()
    state = get_peft_model_state_dict(pm)
    dropped = next(k for k in state if "lin1.lora_B" in k)
    partial = {k: v for k, v in state.items() if k != dropped}
    partial["base_model.model.nothing.lora_A.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="match no adapter tensor"):
        result = set_peft_model_state_dict(pm, partial, strict=False)
    assert result.missing_keys == ["base_model.model.lin1.lora_B.default.weight"]
    assert result.unexpected_keys == ["nothing.lora_A.weight"]


def test_ignore_mismatched_sizes_skips_misshapen_tensors():
    pm = _lora_mlp()
    state = get_peft_model_state_dict(pm)
    key = next(k for k in state if "lin0.lora_A" in k)
    bad = dict(state, **{key: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError):
        set_peft_model_state_dict(pm, bad)
    before = pm.base_model.model.lin0.lora_A["default"].weight.clone()
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        result = set_peft_model_state_dict(pm, bad, ignore_mismatched_sizes=True, strict=False)
    assert torch.equal(pm.base_model.model.lin0.lora_A["default"].weight, before)
    assert result.missing_keys == ["base_model.model.lin0.lora_A.default.weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_with_modules_to_save_runs(dtype):
    torch.manual_seed(0)
    pm = get_peft_model(MLP().to(dtype), LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    dtypes = {n: p.dtype for n, p in pm.named_parameters() if p.requires_grad}
    assert dtypes["base_model.model.lin2.modules_to_save.default.weight"] == dtype  # a copy keeps the base dtype
    assert dtypes["base_model.model.lin0.lora_A.default.weight"] == torch.float32  # adapters are upcast
    out = pm(X.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


class FsdpLike(nn.Module):
    """Names its child as FSDP does (``_fsdp_wrapped_module``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fsdp_wrapped_module(x)


def test_fsdp_wrapper_segments_do_not_change_the_keys():
    plain = _lora_mlp(seed=1)
    torch.manual_seed(0)
    wrapped = get_peft_model(FsdpLike(MLP()), LoraConfig(target_modules=["lin0", "lin1"]))
    keys = set(get_peft_model_state_dict(wrapped))
    assert keys == set(get_peft_model_state_dict(plain)) and not any("_fsdp" in k for k in keys)
    set_peft_model_state_dict(wrapped, get_peft_model_state_dict(plain))
    inner = wrapped.base_model.model._fsdp_wrapped_module
    assert torch.equal(inner.lin0.lora_B["default"].weight, plain.base_model.model.lin0.lora_B["default"].weight)
    # an FSDP full state dict names tensors without the segment; it is read by those names
    fsdp_state = {k.replace("_fsdp_wrapped_module.", ""): torch.ones_like(v) for k, v in wrapped.state_dict().items()}
    saved = get_peft_model_state_dict(wrapped, state_dict=fsdp_state)
    assert all(torch.equal(v, torch.ones_like(v)) for v in saved.values())


def test_disable_adapter_freezes_adapter_tensors_and_restores_them():
    pm = _lora_mlp()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    with pm.disable_adapter():
        assert not any(p.requires_grad for p in pm.parameters())
        assert not pm.has_active_enabled_adapter
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == trainable
    assert pm.has_active_enabled_adapter


# -- the object model ---------------------------------------------------------------------------
def test_tuner_object_model():
    pm = _lora_mlp()
    tuner = pm.base_model
    assert isinstance(tuner, LoraModel) and tuner.prefix == "lora_" and pm.prefix == "lora_"
    assert tuner.model is pm.get_base_model() and tuner.peft_config is pm.peft_config
    assert tuner.active_adapter == "default" and tuner.active_adapters == ["default"]
    assert tuner.targeted_module_names == ["lin0", "lin1"] == pm.targeted_module_names
    pm.add_adapter("b", LoraConfig(target_modules=["lin1"]))
    tuner.set_adapter("b")
    assert pm.active_adapter == "b"
    tuner.delete_adapter("b")
    assert list(pm.peft_config) == ["default"]
    with pm.disable_adapter():
        base_out = pm(X)
    tuner.disable_adapter_layers()
    with torch.no_grad():
        assert torch.allclose(pm(X), base_out)
    assert not any(p.requires_grad for p in pm.parameters())
    tuner.enable_adapter_layers()
    assert not torch.allclose(pm(X), base_out)
    assert any(p.requires_grad for p in pm.parameters())
    merged = pm(X)
    tuner.merge_adapter()
    assert torch.allclose(pm(X), merged, atol=1e-6)
    tuner.unmerge_adapter()
    with pytest.raises(peftkit.PeftkitError, match="made by a PeftModel"):
        LoraModel(MLP(), LoraConfig(target_modules=["lin0"]), "default")


def test_tuner_of_a_deep_copy_points_at_the_copy():
    pm = _lora_mlp()
    clone = copy.deepcopy(pm)
    assert clone.base_model._owner is clone
    clone.add_adapter("b", LoraConfig(target_modules=["lin0"]))
    assert list(pm.peft_config) == ["default"] and list(clone.base_model.peft_config) == ["default", "b"]


def test_layer_api_names():
    pm = _lora_mlp()
    layer = pm.base_model.model.lin0
    assert isinstance(layer, BaseTunerLayer)
    assert layer.active_adapter == "default" and layer.disable_adapters is False and layer.merged is False
    w = layer.get_base_layer().weight.detach().clone()
    delta = layer.get_delta_weight("default")
    assert delta.dtype == w.dtype
    layer.merge(safe_merge=True, adapter_names=["default"])
    assert layer.merged and torch.allclose(layer.get_base_layer().weight, w + delta, atol=1e-6)
    layer.unmerge()
    assert torch.allclose(layer.get_base_layer().weight, w, atol=1e-6)
    layer.enable_adapters(False)
    assert layer.disable_adapters and not any(p.requires_grad for p in layer.lora_A.parameters())
    layer.enable_adapters(True)
    layer.set_adapter("default")  # a plain string, as PEFT allows
    assert layer.active_adapters == ["default"]
    with pytest.raises(peftkit.MergeError, match="list of strings"):
        layer.merge(adapter_names="default")


def test_merging_an_already_merged_adapter_warns():
    pm = _lora_mlp()
    pm.add_adapter("b", LoraConfig(target_modules=["lin0"]))
    pm.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        pm.merge_adapter()
    with pytest.warns(UserWarning, match="Already following adapters were merged default"):
        pm.merge_adapter(["b"])


def test_layer_and_model_status():
    pm = _lora_mlp()
    pm.add_adapter("b", LoraConfig(target_modules=["lin1"]))
    layers = {s.name: s for s in pm.get_layer_status()}
    assert set(layers) == {"model.lin0", "model.lin1"}
    assert layers["model.lin0"].module_type == "lora.Linear" and layers["model.lin0"].available_adapters == ["default"]
    assert layers["model.lin1"].requires_grad == {"default": True, "b": False}
    status = peftkit.get_model_status(pm)
    assert status.adapter_model_type == "LoraModel" and status.base_model_type == "MLP"
    assert status.peft_types == {"default": "LORA", "b": "LORA"} and status.num_adapter_layers == 2
    assert status.available_adapters == ["b", "default"] and status.requires_grad == {"default": True, "b": False}
    assert (status.trainable_params, status.total_params) == pm.get_nb_trainable_parameters()
    pm.base_model.model.lin0.merge()
    assert peftkit.get_model_status(pm).merged_adapters == "irregular"  # merged in lin0, not in lin1
    pm.base_model.model.lin0.enable_adapters(False)
    assert peftkit.get_model_status(pm).enabled == "irregular"
    with pytest.raises(peftkit.PeftkitError, match="No adapter layers found"):
        peftkit.get_layer_status(MLP())
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="soft-prompt"):
        peftkit.get_model_status(prompt)


def test_base_model_state_dict_round_trip():
    torch.manual_seed(0)
    original = MLP()
    expected = {k: v.clone() for k, v in original.state_dict().items()}
    pm = get_peft_model(copy.deepcopy(original), LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    got = peftkit.get_base_model_state_dict(pm)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    new = {k: torch.full_like(v, 0.5) for k, v in expected.items()}
    assert peftkit.set_base_model_state_dict(pm, new) == ([], [])
    assert torch.equal(pm.base_model.model.lin0.base_layer.weight, new["lin0.weight"])
    lora_b = pm.base_model.model.lin0.lora_B["default"].weight
    assert torch.equal(lora_b, torch.zeros_like(lora_b))  # adapters untouched
    with pytest.raises(RuntimeError, match="missing keys"):
        peftkit.set_base_model_state_dict(pm, {"lin0.weight": new["lin0.weight"]})


def test_set_requires_grad_and_peft_type():
    pm = _lora_mlp()
    pm.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in pm.parameters())
    pm.set_requires_grad(["default"])
    assert any(p.requires_grad for p in pm.parameters())
    assert pm.peft_type == PeftType.LORA and not pm._is_prompt_learning
    with pytest.raises(peftkit.AdapterNameError, match="Adapter nope does not exist"):
        pm.set_requires_grad("nope")


def test_add_adapter_autocast_per_call():
    pm = get_peft_model(MLP().to(torch.bfloat16), LoraConfig(target_modules=["lin0"]))
    pm.add_adapter("kept", LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=False)
    layer = pm.base_model.model.lin0
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_A["kept"].weight.dtype == torch.bfloat16


# -- configs ------------------------------------------------------------------------------------
def test_target_modules_is_a_set_and_saved_as_a_sorted_list(tmp_path):
    config = LoraConfig(target_modules=["v", "q", "v"], exclude_modules=["k"])
    assert config.target_modules == {"q", "v"} and config.exclude_modules == {"k"}
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q", "v"]
    ia3 = IA3Config(target_modules=["a", "b"], feedforward_modules=["b"])
    assert ia3.target_modules == {"a", "b"} and ia3.feedforward_modules == {"b"}
    assert check_target_module_exists(config, "model.q") and not check_target_module_exists(config, "model.k")


def test_from_json_file_returns_the_dict(tmp_path):
    config = LoraConfig(r=4, target_modules=["q"])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["runtime_config"] = {"ephemeral_gpu_offload": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    got = LoraConfig.from_json_file(tmp_path / "adapter_config.json")
    assert isinstance(got, dict) and got == config.to_dict()
    assert PeftConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_prompt_config_without_num_virtual_tokens_until_used():
    config = PromptTuningConfig(task_type="CAUSAL_LM")
    assert config.num_virtual_tokens is None
    with pytest.raises(ConfigError, match="num_virtual_tokens is required"):
        get_peft_model(tiny_llama(), config)
    with pytest.raises(ConfigError):
        PromptTuningConfig(num_virtual_tokens=0)


def test_every_hugging_face_peft_type_is_named_and_unimplemented_ones_are_refused(tmp_path):
    assert PeftType.LOHA.value == "LOHA" and PeftType("VERA") is PeftType.VERA
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8}))
    with pytest.raises(ConfigError, match="Unknown peft_type 'LOHA'"):
        PeftConfig.from_pretrained(tmp_path)


# -- the model card -----------------------------------------------------------------------------
def _front(path) -> dict:
    text = path.read_text()
    return yaml.safe_load(text.split("---")[1])


def test_model_card_for_a_model_without_a_hub_name(tmp_path):
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], base_model_name_or_path="MLP"))
    pm.save_pretrained(tmp_path)  # a custom module: base_model_name_or_path is no Hub name of a model
    meta = _front(tmp_path / "README.md")
    assert meta["library_name"] == "peft" and "base_model" not in meta and "lora" in meta["tags"]
    assert len((tmp_path / "README.md").read_text()) > 1000  # a full card: settings, how to load, versions
    local = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                    base_model_name_or_path=str(tmp_path)))
    local.save_pretrained(tmp_path / "local")
    meta = _front(tmp_path / "local" / "README.md")
    assert "base_model" not in meta and meta["pipeline_tag"] == "text-generation"


def test_model_card_with_a_hub_name_and_an_existing_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nmeta: hello\ntags:\n- mine\n---\nThis is a model card\n")
    base = tiny_llama()
    base.config._name_or_path = "org/tiny-llama"  # as from_pretrained("org/tiny-llama") sets it
    pm = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    meta = _front(tmp_path / "README.md")
    assert "This is a model card" in text and meta["meta"] == "hello" and meta["library_name"] == "peft"
    assert meta["base_model"] == "org/tiny-llama" and meta["tags"][0] == "mine"
    assert "base_model:adapter:org/tiny-llama" in meta["tags"]
    (tmp_path / "README.md").write_text("---\n: [bad\n---\nmine\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "---\n: [bad\n---\nmine\n"
    assert any("not a YAML mapping" in str(w.message) for w in caught)


# -- import paths and utilities ------------------------------------------------------------------
def test_hugging_face_import_paths():
    from peftkit.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, get_peft_config
    from peftkit.peft_model import PeftModelForCausalLM, get_layer_status  # noqa: F401
    from peftkit.tuners.lora import Linear, LoraLayer
    from peftkit.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, ModulesToSaveWrapper  # noqa: F401
    from peftkit.utils.save_and_load import get_peft_model_state_dict as g

    assert PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is LoraConfig and PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is LoraModel
    assert g is get_peft_model_state_dict and issubclass(Linear, LoraLayer)
    assert isinstance(get_peft_config({"peft_type": "LORA", "r": 4}), LoraConfig)
    assert peftkit.PeftError is peftkit.PeftkitError
    assert "llama" in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def test_torch_utilities():
    from peftkit.utils import infer_device, shift_tokens_right, transpose

    ids = torch.tensor([[5, 6, -100]])
    assert shift_tokens_right(ids, pad_token_id=0, decoder_start_token_id=2).tolist() == [[2, 5, 6]]
    w = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(transpose(w, True), w.T) and transpose(w, False) is w
    assert infer_device() in ("cpu", "cuda", "xpu", "mps", "npu")
    pm = _lora_mlp()
    model = pm.to(torch.bfloat16)
    peftkit.cast_mixed_precision_params(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_lora_bias_on_a_layer_without_bias_warns_and_refuses_to_merge():
    with pytest.warns(UserWarning, match="has no bias. This means that merging LoRA weights won't be possible"):
        pm = get_peft_model(MLP(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True))
    randomize_adapters(pm)
    before = pm(X)
    with pytest.raises(peftkit.MergeError, match="no bias to merge it into"):
        pm.merge_adapter()
    assert torch.equal(pm(X), before) and not pm.base_model.model.lin0.merged


def test_mixed_model_holds_lora_adapters_active_together():
    torch.manual_seed(0)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]), mixed=True)
    assert isinstance(pm, peftkit.PeftMixedModel)
    pm.add_adapter("b", LoraConfig(target_modules=["lin1"]))
    randomize_adapters(pm)
    pm.set_adapter(["default", "b"])
    both = pm(X)
    pm.set_adapter("default")
    only_a = pm(X)
    assert not torch.allclose(both, only_a)
    pm.set_adapter(["default", "b"])
    merged = pm.merge_and_unload()
    assert torch.allclose(merged(X), both, atol=1e-5)
    mixed = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]), mixed=True)
    with pytest.raises(ConfigError, match="not compatible with the `PeftMixedModel`"):
        mixed.add_adapter("ia3", IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="get_model_status is not supported for PeftMixedModel"):
        mixed.get_model_status()
    with pytest.raises(NotImplementedError):
        mixed.save_pretrained("unused")


def test_nested_disable_adapter_and_set_adapter_inference_mode():
    pm = _lora_mlp()
    adapted = pm(X)
    with pm.disable_adapter():
        base = pm(X)
        with pm.disable_adapter():
            pass
        assert torch.equal(pm(X), base)  # the inner exit does not re-enable the adapters
    assert torch.allclose(pm(X), adapted)
    pm.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in pm.parameters())
    pm.base_model.set_adapter("default")
    assert any(p.requires_grad for p in pm.parameters())


def test_deleting_a_merged_adapter_names_it():
    pm = _lora_mlp()
    pm.merge_adapter()
    with pytest.raises(peftkit.PeftkitError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        pm.delete_adapter("default")
    assert "default" in pm.peft_config


def test_unmatched_patterns_and_exclusions_warn_or_raise():
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match any targeted module"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], alpha_pattern={"typo_key": 100}))
    with pytest.warns(UserWarning, match="exclude_modules=.* but no modules were excluded"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin1"], exclude_modules=["nothing"]))
    with pytest.raises(peftkit.TargetError, match="No modules were targeted for adaptation"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "nothing"], exclude_modules=["lin0"]))
    with pytest.warns(RuntimeWarning, match=r"target_parameters=\['foobar.weight'\] were set but no parameter"):
        pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], target_parameters=["foobar.weight"]))
    assert pm.targeted_module_names == ["lin0"]


def test_config_compat_details(tmp_path):
    assert LoraConfig(peft_type="something").peft_type == PeftType.LORA  # overridden, as PEFT
    with pytest.raises(TypeError, match="missing required keys"):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError):
        LoraConfig(r="8")
    with pytest.raises(ValueError, match="Invalid task type: 'nope'. Must be one of the following task types"):
        LoraConfig(task_type="nope")
    assert repr(_lora_mlp().base_model.model.lin0).startswith("lora.Linear(")


def test_from_pretrained_keeps_the_given_config_object(tmp_path):
    _lora_mlp().save_pretrained(tmp_path)
    config = LoraConfig(target_modules=["lin0", "lin1"])
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode


def test_modules_to_save_called_with_keywords_only():
    class KwargsHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(10, 10)
            self.head = nn.Linear(10, 2)

        def forward(self, x):
            return self.head(input=self.lin(x))

    pm = get_peft_model(KwargsHead(), LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
    assert pm(X).shape == (4, 2)


def test_biases_in_a_state_dict_load_whatever_the_bias_setting():
    torch.manual_seed(0)
    trained = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], bias="all", init_lora_weights=False))
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                m.bias.fill_(1.23)
    expected = trained(X)
    state = get_peft_model_state_dict(trained)
    assert "base_model.model.lin1.bias" in state
    torch.manual_seed(0)
    fresh = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    set_peft_model_state_dict(fresh, state)
    assert torch.allclose(fresh(X), expected)


def test_two_active_adapters_may_not_share_a_modules_to_save_copy():
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    pm.add_adapter("b", LoraConfig(target_modules=["lin1"], modules_to_save=["lin2"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        pm.set_adapter(["default", "b"])
    assert pm.active_adapters == ["default"]


def test_merge_errors_are_also_runtime_errors_and_embeddings_of_plain_modules_warn(tmp_path):
    pm = get_peft_model(MLP(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights=False))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        pm.merge_adapter()

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids):
            return self.emb(ids)

    em = get_peft_model(Emb(), LoraConfig(target_modules=["emb"]))
    with pytest.warns(UserWarning, match="Could not identify embedding layer"):
        em.save_pretrained(tmp_path, save_embedding_layers=True)


@pytest.mark.parametrize("order", [("plain", "dora1", "dora2"), ("dora1", "plain", "dora2")])
def test_merging_several_active_adapters_with_dora_equals_their_forward(order):
    torch.manual_seed(0)
    model = MLP()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    configs = {"plain": LoraConfig(target_modules=["lin0"], init_lora_weights=False),
               "dora1": LoraConfig(target_modules=["lin0"], init_lora_weights=False, use_dora=True),
               "dora2": LoraConfig(target_modules=["lin0"], init_lora_weights=False, use_dora=True)}
    pm = get_peft_model(model, configs[order[0]], adapter_name=order[0]).eval()
    for name in order[1:]:
        pm.add_adapter(name, configs[name])
    pm.set_adapter(list(order))
    with torch.no_grad():
        combined = pm(X)
        pm.merge_adapter(safe_merge=True)
        assert torch.allclose(pm(X), combined, atol=1e-5)
        pm.unmerge_adapter()
        base_weight = pm.base_model.model.lin0.get_base_layer().weight
        assert torch.allclose(base_weight, original["lin0.weight"], atol=1e-5)
        assert torch.allclose(pm(X), combined, atol=1e-5)


def test_loraplus_optimizer_groups_and_a_training_step():
    from peftkit.optimizers import create_loraplus_optimizer

    pm = _lora_mlp()
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    names = {id(p): n for n, p in pm.named_parameters()}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-6, 1e-3 * 16, 1e-3 * 16]
    assert all("lora_A" in n for n in groups[0]) and all("lora_B" in n for n in groups[2]) and groups[1] == []
    assert opt.param_groups[3]["weight_decay"] == 0.0 and opt.param_groups[2]["weight_decay"] == 0.1
    b_before = pm.base_model.model.lin0.lora_B["default"].weight.detach().clone()
    pm(X).sum().backward()
    opt.step()
    assert not torch.equal(pm.base_model.model.lin0.lora_B["default"].weight, b_before)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be a positive number"):
        create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)


def test_pissa_weight_conversion_on_save_is_refused_not_ignored(tmp_path):
    pm = _lora_mlp()
    with pytest.raises(peftkit.PeftkitError, match="path_initial_model_for_weight_conversion"):
        pm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()


def test_more_peft_phrases_and_the_active_copy_of_modules_to_save():
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    wrapper = pm.base_model.model.lin1
    assert wrapper.bias is wrapper.modules_to_save["default"].bias and wrapper.in_features == 20
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope"):
        pm(X, adapter_names=["nope"] * 4)
    with pytest.raises(ValueError, match="All modules were excluded"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], exclude_modules=["lin0", "lin1", "lin2", "relu"]))
    prompt = PromptTuningConfig(num_virtual_tokens=2, task_type="QUESTION_ANS")  # accepted as a config
    with pytest.raises(ConfigError, match="QUESTION_ANS"):
        get_peft_model(tiny_llama(), prompt)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.linear(x))


def _norm_base() -> nn.Module:
    torch.manual_seed(0)
    return WithBatchNorm()


def _trained_norm() -> PeftModel:
    pm = get_peft_model(_norm_base(), LoraConfig(target_modules=["linear"], modules_to_save=["norm"]))
    pm.train()
    for _ in range(3):
        pm(torch.randn(8, 3))  # running statistics of the copy move
    return pm.eval()


def test_modules_to_save_buffers_are_saved_and_loaded(tmp_path):
    pm = _trained_norm()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    expected = pm(x)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.norm.num_batches_tracked"].item() == 3 and "base_model.model.norm.running_mean" in saved
    loaded = PeftModel.from_pretrained(_norm_base(), tmp_path)
    assert torch.allclose(loaded(x), expected)
    assert loaded.base_model.model.norm.modules_to_save["default"].num_batches_tracked.item() == 3
    # a file without the buffers (written before peftkit saved them) still loads
    old = {k: v for k, v in saved.items() if "running" not in k and "num_batches" not in k}
    fresh = get_peft_model(WithBatchNorm(), LoraConfig(target_modules=["linear"], modules_to_save=["norm"]))
    assert set_peft_model_state_dict(fresh, old).missing_keys == []


def test_modules_to_save_buffers_interop_with_hugging_face_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pm = _trained_norm()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    expected = pm(x)
    pm.save_pretrained(tmp_path / "kit")
    theirs = peft.PeftModel.from_pretrained(_norm_base(), tmp_path / "kit").eval()
    assert torch.allclose(theirs(x), expected)
    theirs.save_pretrained(tmp_path / "hf")
    ours = PeftModel.from_pretrained(_norm_base(), tmp_path / "hf")
    assert torch.allclose(ours(x), expected)


def test_tuner_get_model_config():
    from peftkit.tuners.tuners_utils import BaseTuner

    assert BaseTuner.get_model_config(MLP()) == {"model_type": "custom"}
    assert BaseTuner.get_model_config(tiny_llama())["model_type"] == "llama"


def test_forward_signature_is_the_base_models_so_trainer_keeps_the_columns(tmp_path):
    """transformers' Trainer with default arguments drops the dataset columns the model's forward does
    not name (remove_unused_columns): the PeftModel's forward shows the wrapped model's arguments."""
    import inspect

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from peftkit import load_model

    model, tokenizer = load_model()
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    params = inspect.signature(pm.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    ids = tokenizer(["once upon a time there was a dog"] * 8)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    before = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             learning_rate=1e-2, use_cpu=True, save_strategy="no")  # checkpoints: issue 15
    Trainer(model=pm, args=args, train_dataset=data).train()
    assert not torch.equal(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight, before)


def test_bad_input_to_the_new_utilities_is_refused_cleanly():
    from peftkit.optimizers import create_loraplus_optimizer

    pm = _lora_mlp()
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a torch.Tensor"):
        peftkit.set_base_model_state_dict(pm, {"lin0.weight": "x"})
    with pytest.raises(CheckpointError, match="has shape"):
        peftkit.set_base_model_state_dict(pm, {k: torch.zeros(1) for k in peftkit.get_base_model_state_dict(pm)})
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items())  # nothing was loaded
    with pytest.raises(peftkit.PeftkitError, match="take a model"):
        peftkit.get_model_status("model")
    with pytest.raises(ConfigError, match="must be an nn.Module"):
        create_loraplus_optimizer("model", torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=2)


def test_modules_to_save_wrappers_are_not_base_tuner_layers_as_in_hugging_face_peft():
    """TRL refuses a ``lm_head`` that is a ``BaseTunerLayer`` (its loss reads ``lm_head.weight``) and trains
    one in ``modules_to_save``: the same modules must answer ``isinstance(m, BaseTunerLayer)`` as in PEFT."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTunerLayer as HFBaseTunerLayer

    from peftkit.tuners.lora import LoraLayer
    from peftkit.utils import ModulesToSaveWrapper

    def tuner_layers(model, cls):
        return sorted(n for n, m in model.named_modules() if isinstance(m, cls))

    kw = dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=["lm_head"], init_lora_weights=False,
              trainable_token_indices={"embed_tokens": [3, 5]})
    torch.manual_seed(0)
    ours = get_peft_model(tiny_llama(), LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    theirs.load_state_dict(ours.state_dict())
    ids = torch.tensor([[1, 4, 9, 16, 25, 36]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-6)
    # PEFT's trainable-tokens layer is one module down (embed_tokens.token_adapter): compare the LoRA layers
    hf_names = [n.removesuffix(".token_adapter") for n in tuner_layers(theirs, HFBaseTunerLayer)]
    assert tuner_layers(ours, BaseTunerLayer) == sorted(hf_names)
    head = ours.get_output_embeddings()
    assert isinstance(head, ModulesToSaveWrapper) and not isinstance(head, BaseTunerLayer)
    assert not isinstance(theirs.get_output_embeddings(), HFBaseTunerLayer)
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, BaseTunerLayer)
    assert issubclass(LoraLayer, BaseTunerLayer) and not issubclass(ModulesToSaveWrapper, BaseTunerLayer)
    assert not isinstance(nn.Linear(2, 2), BaseTunerLayer) and not issubclass(nn.Linear, BaseTunerLayer)
    ours.base_model.model.lm_head.modules_to_save["default"].weight.data.add_(1.0)
    with torch.no_grad():  # the head copy is what trains and counts
        assert not torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-3)


def test_functional_delete_adapter_of_an_adapter_already_deleted_is_a_no_op_as_in_hugging_face_peft():
    """transformers' ``delete_adapter(["a", "a"])`` calls ``peft.functional.delete_adapter`` once per name."""
    peft = pytest.importorskip("peft")
    import peft.functional as hf_functional

    from peftkit import functional, inject_adapter_in_model

    ids = torch.tensor([[1, 4, 9, 16, 25, 36]])
    results = {}
    for lib, inject, fn in (("kit", inject_adapter_in_model, functional), ("hf", peft.inject_adapter_in_model,
                                                                          hf_functional)):
        model = tiny_llama()
        for seed, name in enumerate(["a", "b"]):
            cfg = (LoraConfig if lib == "kit" else peft.LoraConfig)(r=4, target_modules=["q_proj", "v_proj"])
            inject(cfg, model, adapter_name=name)
            torch.manual_seed(seed)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if f".{name}." in n and "lora_" in n:
                        p.copy_(torch.randn_like(p) * 0.2)
        fn.set_adapter(model, "b")
        with torch.no_grad():
            only_b = model(ids).logits
        fn.set_adapter(model, ["a", "b"])
        first = fn.delete_adapter(model, "a", prefix="lora_")
        second = fn.delete_adapter(model, "a", prefix="lora_")
        with torch.no_grad():
            after = model(ids).logits
        assert not any(".a." in n for n, _ in model.named_parameters())
        results[lib] = (first, second, only_b, after)
    assert results["kit"][:2] == results["hf"][:2] == (["b"], ["b"])
    assert torch.allclose(results["kit"][3], results["kit"][2], atol=1e-6)
    assert torch.allclose(results["kit"][3], results["hf"][3], atol=1e-6)
