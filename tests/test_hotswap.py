"""Hot-swapping LoRA adapters (peftkit.hotswap): a swapped model computes what a fresh load of the
other adapter computes, its tensors stay the same objects, a compiled model gives the new outputs
without recompiling, and bad input raises HotswapError before anything changes."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peftkit.errors import AdapterNameError, ConfigError, HotswapError
from peftkit.hotswap import (
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)
from peftkit.checkpoint import get_peft_model_state_dict, load_peft_weights

from .models import MLP

ATOL = 1e-5


class Conv(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=groups)
        self.emb = nn.Embedding(12, 6)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)) + self.emb(tokens).mean(1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def conv(groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return Conv(groups)


X = torch.rand(3, 10)
CONV_IN = (torch.rand(2, 4, 6, 6), torch.randint(0, 12, (2, 5)))


def save_adapter(tmp_path, name, make, config, seed, inputs):
    """Save a random (non-zero) adapter; return its folder and the output it gives."""
    base = make()
    torch.manual_seed(seed)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        out = model(*inputs)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, out


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("cfg0, cfg1", [
    (dict(r=8, lora_alpha=8, target_modules=["lin0", "lin1"]), dict(r=8, lora_alpha=8, target_modules=["lin0", "lin1"])),
    # the second adapter targets fewer modules (lin1 zeroed), has a larger rank (grown) and another alpha
    (dict(r=7, lora_alpha=7, target_modules=["lin0", "lin1"]), dict(r=13, lora_alpha=5, target_modules=["lin0"])),
    (dict(r=13, lora_alpha=3, target_modules=["lin0"]), dict(r=4, lora_alpha=9, target_modules=["lin0"],
                                                          rank_pattern={"lin0": 2}, alpha_pattern={})),
    (dict(r=4, use_rslora=True, lora_bias=True, target_modules=["lin0"]),
     dict(r=6, use_rslora=True, lora_bias=True, target_modules=["lin0"])),
])
def test_swap_gives_the_other_adapters_outputs(tmp_path, cfg0, cfg1):
    path0, out0 = save_adapter(tmp_path, "a0", mlp, LoraConfig(init_lora_weights=False, **cfg0), 0, (X,))
    path1, out1 = save_adapter(tmp_path, "a1", mlp, LoraConfig(init_lora_weights=False, **cfg1), 1, (X,))
    assert not torch.allclose(out0, out1, atol=1e-3)
    model = PeftModel.from_pretrained(mlp(), path0).eval()
    assert torch.allclose(run(model, (X,)), out0, atol=ATOL)
    hotswap_adapter(model, path1, adapter_name="default")
    assert torch.allclose(run(model, (X,)), out1, atol=ATOL)
    with torch.enable_grad():  # the general path agrees with the no-grad road
        assert torch.allclose(model(X), out1, atol=ATOL)
    hotswap_adapter(model, path0, adapter_name="default")
    assert torch.allclose(run(model, (X,)), out0, atol=ATOL)


def test_swap_keeps_the_tensor_objects_and_requires_grad(tmp_path):
    config = LoraConfig(init_lora_weights=False, target_modules=["lin0", "lin1"])
    path1, out1 = save_adapter(tmp_path, "a1", mlp, config, 1, (X,))
    model = get_peft_model(mlp(), config)
    before = {n: p for n, p in model.named_parameters() if "lora_" in n}
    hotswap_adapter(model, path1, adapter_name="default")
    after = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(after[n] is p and p.requires_grad for n, p in before.items())
    assert torch.allclose(run(model.eval(), (X,)), out1, atol=ATOL)


def test_swap_of_dora_and_of_conv_and_embedding_layers(tmp_path):
    config = LoraConfig(init_lora_weights=False, use_dora=True, target_modules=["lin0", "lin1"])
    path1, out1 = save_adapter(tmp_path, "d1", mlp, config, 1, (X,))
    model = get_peft_model(mlp(), config).eval()
    hotswap_adapter(model, path1, adapter_name="default")
    assert torch.allclose(run(model, (X,)), out1, atol=ATOL)

    for r0, r1 in [(2, 6), (6, 2)]:
        c0 = LoraConfig(init_lora_weights=False, r=r0, target_modules=["conv", "emb"])
        c1 = LoraConfig(init_lora_weights=False, r=r1, target_modules=["conv", "emb"])
        p0, o0 = save_adapter(tmp_path, f"c0_{r0}", conv, c0, 0, CONV_IN)
        p1, o1 = save_adapter(tmp_path, f"c1_{r1}", conv, c1, 1, CONV_IN)
        model = PeftModel.from_pretrained(conv(), p0).eval()
        hotswap_adapter(model, p1, adapter_name="default")
        assert torch.allclose(run(model, CONV_IN), o1, atol=ATOL)
        hotswap_adapter(model, p0, adapter_name="default")
        assert torch.allclose(run(model, CONV_IN), o0, atol=ATOL)


@pytest.mark.parametrize("ranks", [(2, 4), (4, 2)])
def test_grouped_conv_swap_after_padding(tmp_path, ranks):
    make = lambda: conv(groups=2)  # noqa: E731
    c0 = LoraConfig(init_lora_weights=False, r=ranks[0], target_modules=["conv"])
    c1 = LoraConfig(init_lora_weights=False, r=ranks[1], target_modules=["conv"])
    p0, o0 = save_adapter(tmp_path, "g0", make, c0, 0, CONV_IN)
    p1, o1 = save_adapter(tmp_path, "g1", make, c1, 1, CONV_IN)
    model = PeftModel.from_pretrained(make(), p0).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=max(ranks))
    assert torch.allclose(run(model, CONV_IN), o0, atol=ATOL)
    hotswap_adapter(model, p1, adapter_name="default")
    assert torch.allclose(run(model, CONV_IN), o1, atol=ATOL)
    hotswap_adapter(model, p0, adapter_name="default")
    assert torch.allclose(run(model, CONV_IN), o0, atol=ATOL)


def test_compiled_model_gives_the_new_outputs_without_recompiling(tmp_path):
    import torch._dynamo

    c0 = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    c1 = LoraConfig(init_lora_weights=False, r=8, lora_alpha=3, target_modules=["lin0"])
    p0, o0 = save_adapter(tmp_path, "a0", mlp, c0, 0, (X,))
    p1, o1 = save_adapter(tmp_path, "a1", mlp, c1, 1, (X,))
    model = PeftModel.from_pretrained(mlp(), p0).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    assert model.peft_config["default"].r == 8
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.allclose(run(compiled, (X,)), o0, atol=ATOL)
        hotswap_adapter(compiled, p1, adapter_name="default")
        assert torch.allclose(run(compiled, (X,)), o1, atol=ATOL)
        hotswap_adapter(compiled, p0, adapter_name="default")
        assert torch.allclose(run(compiled, (X,)), o0, atol=ATOL)
    torch._dynamo.reset()


# -- prepare_model_for_compiled_hotswap --------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_prepare_pads_and_makes_tensor_scalings_without_changing_outputs(requires_grad):
    config = LoraConfig(init_lora_weights=False, r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 6},
                        lora_bias=True)
    model = get_peft_model(mlp(), config).eval()
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(requires_grad)
    before = run(model, (X,))
    scalings = {n: dict(m.scaling) for n, m in model.named_modules() if hasattr(m, "scaling")}
    prepare_model_for_compiled_hotswap(model, target_rank=9, config=config)
    for n, m in model.named_modules():
        if hasattr(m, "scaling"):
            assert all(isinstance(v, torch.Tensor) and v.item() == pytest.approx(scalings[n][k])
                       for k, v in m.scaling.items())
            assert m.r["default"] == 9
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert p.shape[0] == 9
        elif "lora_B" in n and n.endswith("weight"):
            assert p.shape[1] == 9
        if "lora_" in n:
            assert p.requires_grad is requires_grad
    assert config.r == 9 and config.rank_pattern == {"lin1": 9}
    assert torch.allclose(run(model, (X,)), before, atol=ATOL)
    with torch.enable_grad():
        assert torch.allclose(model(X), before, atol=ATOL)
    # mixed batches stack the padded adapters
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        mixed = model(X, adapter_names=["default", "other", "default"])
    assert torch.allclose(mixed[0::2], before[0::2], atol=ATOL)


def test_prepare_pads_conv_and_embedding_layers():
    model = get_peft_model(conv(groups=2), LoraConfig(init_lora_weights=False, r=2, target_modules=["conv", "emb"])).eval()
    before = run(model, CONV_IN)
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    conv_layer = model.base_model.model.conv
    assert conv_layer.lora_A["default"].weight.shape[0] == 6
    assert conv_layer.lora_B["default"].weight.shape[1] * 2 == 6
    assert model.base_model.model.emb.lora_embedding_A["default"].shape[0] == 6
    assert torch.allclose(run(model, CONV_IN), before, atol=ATOL)


def test_prepare_rejects_bad_input_and_changes_nothing():
    model = get_peft_model(mlp(), LoraConfig(r=8, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 10}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HotswapError, match=re.escape("target rank 9, but the original rank is larger (10)")):
        prepare_model_for_compiled_hotswap(model, target_rank=9)
    with pytest.raises(ConfigError, match="target_rank"):
        prepare_model_for_compiled_hotswap(model, target_rank=0)
    with pytest.raises(ConfigError, match="check_compiles should be one of"):
        prepare_model_for_compiled_hotswap(model, check_compiled="wrong-option")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(isinstance(v, float) for m in model.modules() if hasattr(m, "scaling") for v in m.scaling.values())
    grouped = get_peft_model(conv(groups=2), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(HotswapError, match="not divisible by 2"):
        prepare_model_for_compiled_hotswap(grouped, target_rank=3)
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(mlp())


def test_prepare_on_a_compiled_model():
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"]))
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match=re.escape("*before* compiling")):
        prepare_model_for_compiled_hotswap(compiled)
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_compiled_hotswap(compiled, check_compiled="ignore")


# -- errors -------------------------------------------------------------------------------------


def test_incompatible_configs_raise():
    lora = LoraConfig(target_modules=["lin0"])
    with pytest.raises(HotswapError, match="Incompatible PEFT types found: LORA and IA3"):
        check_hotswap_configs_compatible(lora, IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    ia3 = IA3Config(target_modules=["lin0"], feedforward_modules=[])
    with pytest.raises(HotswapError, match="Hotswapping only supports LORA but IA3 was passed"):
        check_hotswap_configs_compatible(ia3, ia3)
    with pytest.raises(HotswapError, match="for use_rslora, False != True"):
        check_hotswap_configs_compatible(lora, LoraConfig(target_modules=["lin0"], use_rslora=True))
    check_hotswap_configs_compatible(lora, LoraConfig(target_modules=["lin1"], r=3, lora_alpha=7))


def test_bad_swaps_raise_and_change_nothing(tmp_path):
    config = LoraConfig(init_lora_weights=False, target_modules=["lin0"])
    path_ia3, _ = save_adapter(tmp_path, "ia3", mlp, IA3Config(target_modules=["lin0"], feedforward_modules=[]), 1, (X,))
    path_wide, _ = save_adapter(tmp_path, "wide", mlp, LoraConfig(init_lora_weights=False,
                                                                   target_modules=["lin0", "lin1"]), 1, (X,))
    path_rs, _ = save_adapter(tmp_path, "rs", mlp, LoraConfig(init_lora_weights=False, use_rslora=True,
                                                               target_modules=["lin0"]), 1, (X,))
    model = get_peft_model(mlp(), config).eval()
    before = run(model, (X,))
    with pytest.raises(HotswapError, match="Incompatible PEFT types"):
        hotswap_adapter(model, path_ia3, adapter_name="default")
    with pytest.raises(RuntimeError, match=re.escape("unexpected keys found: base_model.model.lin1.lora_A.default.weight")):
        hotswap_adapter(model, path_wide, adapter_name="default")
    with pytest.raises(HotswapError, match="use_rslora"):
        hotswap_adapter(model, path_rs, adapter_name="default")
    with pytest.raises(AdapterNameError):
        hotswap_adapter(model, path_wide, adapter_name="nope")
    with pytest.raises(HotswapError, match="needs a PeftModel"):
        hotswap_adapter(mlp(), path_wide, adapter_name="default")
    weights = load_peft_weights(path_wide)
    bad = {"base_model.model.lin0.lora_A.weight": torch.zeros(8, 3)}  # another in_features
    with pytest.raises(HotswapError, match="Incompatible shapes"):
        hotswap_adapter_from_state_dict(model, bad, "default", config)
    assert "base_model.model.lin0.lora_A.weight" in weights
    assert torch.equal(run(model, (X,)), before)


def test_merged_adapter_cannot_be_swapped_but_another_merged_one_is_fine(tmp_path):
    config = LoraConfig(init_lora_weights=False, target_modules=["lin0"])
    path1, out1 = save_adapter(tmp_path, "a1", mlp, config, 1, (X,))
    model = get_peft_model(mlp(), config).eval()
    model.merge_adapter()
    with pytest.raises(HotswapError, match="merged"):
        hotswap_adapter(model, path1, adapter_name="default")
    model.unmerge_adapter()
    model.add_adapter("other", config)
    model.merge_adapter(adapter_names=["other"])
    hotswap_adapter(model, path1, adapter_name="default")
    model.unmerge_adapter()
    assert torch.allclose(run(model, (X,)), out1, atol=ATOL)


def test_missing_tensors_are_zeroed_and_state_dict_keys_of_either_form_work():
    config = LoraConfig(init_lora_weights=False, target_modules=["lin0", "lin1"])
    base = mlp()
    torch.manual_seed(1)
    other = get_peft_model(base, config)
    tensors = get_peft_model_state_dict(other)  # file keys
    del tensors["base_model.model.lin1.lora_A.weight"]
    model = get_peft_model(mlp(), config).eval()
    hotswap_adapter_from_state_dict(model, tensors, "default", config)
    lin1 = model.base_model.model.lin1
    assert (lin1.lora_A["default"].weight == 0).all()
    assert torch.equal(model.base_model.model.lin0.lora_A["default"].weight, other.base_model.model.lin0.lora_A["default"].weight)
    # in-memory keys (with the adapter name), relative to a model with injected layers
    plain = inject_adapter_in_model(config, mlp())
    new = {"lin0.lora_A.default.weight": torch.ones(8, 10), "lin0.lora_B.default.weight": torch.ones(20, 8),
           "lin1.lora_A.default.weight": torch.ones(8, 20), "lin1.lora_B.default.weight": torch.ones(20, 8)}
    hotswap_adapter_from_state_dict(plain, new, "default", LoraConfig(target_modules=["lin0", "lin1"], lora_alpha=16))
    assert (plain.lin0.lora_B["default"].weight == 1).all() and plain.lin0.scaling["default"] == 2.0


def test_swap_of_an_adapter_written_by_hf_peft(tmp_path):
    peft = pytest.importorskip("peft", minversion="0.21")
    base = mlp()
    torch.manual_seed(1)
    hf = peft.get_peft_model(base, peft.LoraConfig(r=6, lora_alpha=3, target_modules=["lin0", "lin1"],
                                                     init_lora_weights=False)).eval()
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(X)
    model = get_peft_model(mlp(), LoraConfig(r=4, init_lora_weights=False, target_modules=["lin0", "lin1"])).eval()
    hotswap_adapter(model, tmp_path / "hf", adapter_name="default")
    assert torch.allclose(run(model, (X,)), expected, atol=ATOL)
