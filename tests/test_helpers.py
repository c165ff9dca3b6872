"""peftkit.helpers (rescale_adapter_scale, disable_input_dtype_casting, DoraCaching, check_if_peft_model,
update_*signature) and low_cpu_mem_usage (adapters created on the meta device, assigned on load)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import (
    CheckpointError,
    ConfigError,
    IA3Config,
    LoraConfig,
    PeftkitError,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from peftkit.helpers import (
    DoraCaching,
    check_if_peft_model,
    disable_input_dtype_casting,
    rescale_adapter_scale,
    update_forward_signature,
    update_generate_signature,
    update_signature,
)
from peftkit.hotswap import prepare_model_for_compiled_hotswap

from .models import CNN, MLP, tiny_llama

ATOL = 1e-5
X = torch.rand(3, 10)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def lora_mlp(seed: int = 1, **kw) -> nn.Module:
    base = mlp()
    torch.manual_seed(seed)
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return get_peft_model(base, LoraConfig(init_lora_weights=False, **kw)).eval()


def run(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


# -- rescale_adapter_scale ----------------------------------------------------------------------


@pytest.mark.parametrize("tensor_scalings", [False, True])
def test_rescale_scales_the_delta_and_restores(tensor_scalings):
    model = lora_mlp(lora_alpha=8)
    if tensor_scalings:
        prepare_model_for_compiled_hotswap(model)
    with model.disable_adapter():
        base = run(model, X)
    full = run(model, X)
    with rescale_adapter_scale(model, 0):
        assert torch.allclose(run(model, X), base, atol=ATOL)
    half_config = copy.deepcopy(model)  # the same adapter with lora_alpha halved is the reference
    for m in half_config.modules():
        if hasattr(m, "scaling"):
            m.scaling = {k: v / 2 for k, v in m.scaling.items()}
    with rescale_adapter_scale(model, 0.5):
        half = run(model, X)
        with torch.enable_grad():
            assert torch.allclose(model(X), half, atol=ATOL)
    assert torch.allclose(half, run(half_config, X), atol=ATOL)
    assert not torch.allclose(half, full, atol=1e-4)
    assert torch.allclose(run(model, X), full, atol=ATOL)


def test_rescale_restores_on_error_and_rejects_bad_input():
    model = lora_mlp()
    full = run(model, X)
    scalings = [m.scaling for m in model.modules() if hasattr(m, "scaling")]
    with pytest.raises(RuntimeError, match="boom"):
        with rescale_adapter_scale(model, 3):
            raise RuntimeError("boom")
    assert [m.scaling for m in model.modules() if hasattr(m, "scaling")] == scalings
    assert torch.allclose(run(model, X), full, atol=ATOL)
    with pytest.raises(TypeError, match="multiplier should be of type float"):
        with rescale_adapter_scale(model, "a"):
            pass
    with pytest.raises(PeftkitError, match="only supported for models with `LoraLayer`s"):
        with rescale_adapter_scale(mlp(), 0.5):
            pass


def test_rescale_with_several_adapters_and_merged():
    model = lora_mlp()
    model.add_adapter("other", LoraConfig(init_lora_weights=False, target_modules=["lin1"], lora_alpha=4))
    for names in (["default"], ["default", "other"]):
        model.set_adapter(names)
        with rescale_adapter_scale(model, 0.0), model.disable_adapter():
            base = run(model, X)
        with rescale_adapter_scale(model, 0.0):
            assert torch.allclose(run(model, X), base, atol=ATOL)
    model.set_adapter("default")
    with rescale_adapter_scale(model, 0.5):
        unmerged = run(model, X)
        model.merge_adapter()
        assert torch.allclose(run(model, X), unmerged, atol=1e-4)
        model.unmerge_adapter()


# -- disable_input_dtype_casting ----------------------------------------------------------------


def test_disable_input_dtype_casting():
    model = lora_mlp()
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
    seen = []

    def upcast(module, args):  # a layer-wise casting hook: weights to the input's dtype
        for p in module.parameters(recurse=False):
            p.data = p.data.to(args[0].dtype)
        seen.append(args[0].dtype)

    layer = model.base_model.model.lin0
    hooks = [m[k].register_forward_pre_hook(upcast) for name in ("lin0", "lin1")
             for m in (model.base_model.model.get_submodule(name).lora_A, model.base_model.model.get_submodule(name).lora_B)
             for k in m]
    out_cast = run(model, X)  # default: the input is cast to bfloat16, the hooks do not run
    assert seen == []
    with disable_input_dtype_casting(model, active=False):
        assert layer.cast_input_dtype_enabled
    with disable_input_dtype_casting(model):
        assert not layer.cast_input_dtype_enabled
        out = run(model, X)
    assert seen and set(seen) == {torch.float32}
    assert layer.cast_input_dtype_enabled
    assert layer.lora_A["default"].weight.dtype == torch.float32  # the hook cast it
    for h in hooks:
        h.remove()
    assert torch.allclose(out, out_cast, atol=0.05)
    assert torch.allclose(run(model, X), out, atol=ATOL)  # float32 weights now: no casting needed


# -- DoraCaching ----------------------------------------------------------------------------------


def caches(model):
    return [m._dora_cache for m in model.modules() if hasattr(m, "_dora_cache")]


@pytest.mark.parametrize("target", ["linear", "conv_and_embedding"])
def test_dora_caching(target):
    DoraCaching()(enabled=False)
    if target == "linear":
        model, inputs = lora_mlp(use_dora=True), (X,)
    else:
        torch.manual_seed(0)
        base = CNN()
        inputs = (torch.rand(2, 3, 4, 4), torch.randint(0, 30, (2, 5)))
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, use_dora=True,
                                                target_modules=["emb", "conv1d", "conv2d"])).eval()
    reference = model(*inputs).detach()
    assert caches(model) and not any(caches(model))
    with DoraCaching():
        assert DoraCaching.is_enabled()
        assert torch.allclose(model(*inputs), reference, atol=ATOL)
        assert all(caches(model))
        assert torch.allclose(model(*inputs), reference, atol=ATOL)  # from the cache
    assert not DoraCaching.is_enabled()
    assert torch.allclose(model(*inputs), reference, atol=ATOL)
    assert not any(caches(model))  # a forward with caching off drops them
    model.train()
    with DoraCaching():
        model(*inputs)
        assert not any(caches(model))  # never in train mode
    model.eval()
    DoraCaching()(enabled=True)
    try:
        model(*inputs)
        assert all(caches(model))
        model.train()
        assert not any(caches(model))
        model.eval()
        # a weight changed in place is not served from a stale cache
        model(*inputs)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(3)
        cached = model(*inputs).detach()
    finally:
        DoraCaching()(enabled=False)
    assert torch.allclose(cached, model(*inputs), atol=ATOL)
    assert not torch.allclose(cached, reference, atol=1e-4)


# -- check_if_peft_model, signatures ---------------------------------------------------------------


def test_check_if_peft_model(tmp_path):
    lora_mlp().save_pretrained(tmp_path / "adapter")
    assert check_if_peft_model(tmp_path / "adapter")
    assert check_if_peft_model(str(tmp_path / "adapter"))
    assert not check_if_peft_model(tmp_path)  # no config
    assert not check_if_peft_model(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    assert not check_if_peft_model(tmp_path / "broken")


def test_update_signature():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    base_cls = type(model.get_base_model())
    ids = torch.randint(1, 64, (1, 5))
    before = model(input_ids=ids).logits
    update_signature(model)
    assert model.forward.__doc__ == base_cls.forward.__doc__
    assert model.generate.__doc__ == base_cls.generate.__doc__
    assert model.forward.__annotations__ == base_cls.forward.__annotations__
    assert torch.equal(model(input_ids=ids).logits, before)  # the same code runs
    assert type(model).forward.__doc__ != base_cls.forward.__doc__  # only this instance changed
    with pytest.raises(ConfigError, match="not supported"):
        update_signature(model, "backward")
    plain = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"]))
    update_generate_signature(plain)  # the base has no generate: nothing happens
    assert "generate" not in vars(plain)
    update_forward_signature(plain)
    assert plain.forward.__doc__ == MLP.forward.__doc__


# -- low_cpu_mem_usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_low_cpu_mem_usage_loads_the_same_model(tmp_path, use_dora):
    targets = ["lin0", "lin1"]
    reference = lora_mlp(use_dora=use_dora)
    reference.save_pretrained(tmp_path)
    expected = run(reference, X)
    fresh = get_peft_model(mlp(), LoraConfig(target_modules=targets, use_dora=use_dora), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in fresh.named_parameters() if "lora_" in n} == {"meta"}
    assert {p.device.type for n, p in fresh.named_parameters() if "lora_" not in n} == {"cpu"}

    loaded = PeftModel.from_pretrained(mlp(), tmp_path, low_cpu_mem_usage=True).eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.allclose(run(loaded, X), expected, atol=ATOL)

    other = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"]))
    other.load_adapter(tmp_path, "other", low_cpu_mem_usage=True, torch_device="cpu")
    other.set_adapter("other")
    assert {p.device.type for p in other.parameters()} == {"cpu"}
    assert torch.allclose(run(other.eval(), X), expected, atol=ATOL)

    plain = inject_adapter_in_model(LoraConfig(target_modules=targets, use_dora=use_dora), mlp(), low_cpu_mem_usage=True)
    assert {p.device.type for p in plain.parameters()} == {"meta", "cpu"}
    state = {k[len("base_model.model."):]: v for k, v in load_peft_weights(tmp_path).items()}
    result = set_peft_model_state_dict(plain, state, low_cpu_mem_usage=True)
    assert result.unexpected_keys == [] and result.missing_keys == []
    assert {p.device.type for p in plain.parameters()} == {"cpu"}
    assert torch.allclose(run(plain.eval(), X), expected, atol=ATOL)
    plain2 = inject_adapter_in_model(LoraConfig(target_modules=targets, use_dora=use_dora), mlp(),
                                     low_cpu_mem_usage=True, state_dict=state)
    assert torch.allclose(run(plain2.eval(), X), expected, atol=ATOL)


def test_low_cpu_mem_usage_with_other_methods_and_trainable_after_load(tmp_path):
    torch.manual_seed(0)
    ia3 = get_peft_model(mlp(), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    with torch.no_grad():
        for n, p in ia3.named_parameters():
            if "ia3_" in n:
                p.uniform_(0.5, 1.5)
    ia3.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    assert torch.allclose(run(loaded, X), run(ia3, X), atol=ATOL)
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cpu" for p in trainable)
    loaded(X).sum().backward()
    assert all(p.grad is not None for p in trainable)


def test_low_cpu_mem_usage_load_with_a_missing_tensor_fails_cleanly(tmp_path):
    lora_mlp().save_pretrained(tmp_path)
    state = load_peft_weights(tmp_path)
    del state["base_model.model.lin1.lora_B.weight"]
    plain = inject_adapter_in_model(LoraConfig(target_modules=["lin0", "lin1"]), mlp(), low_cpu_mem_usage=True)
    with pytest.raises(CheckpointError, match="meta device"):
        set_peft_model_state_dict(plain, state, strict=False)
    assert {p.device.type for n, p in plain.named_parameters() if "lora_" in n} == {"meta"}  # nothing assigned
