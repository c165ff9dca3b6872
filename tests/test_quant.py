"""QLoRA: int8 / NF4 frozen bases (peftkit.quant) and the adapters that wrap them.

Bounds checked here come from the formats' definitions (see peftkit/quant.py): int8
``|W - Ŵ| <= s_row / 2``; NF4 ``|w - ŵ| <= c_block · max_gap / 2``; double quantization adds the
error of the block scale. The real-model tests use the bundled stories260k Llama (hidden 64,
intermediate 172, so 4-bit uses block_size=4 there, or block 64 with down_proj skipped).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import (
    Int8Linear,
    LoraConfig,
    NF4Linear,
    PeftkitError,
    PeftModel,
    dequantize_model,
    get_peft_model,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
)
from peftkit.errors import MergeError, PeftkitWarning
from peftkit.quant import (
    NF4_LEVELS,
    NF4_MAX_ERROR,
    QuantizedLinear,
    dequantize_scales,
    nf4_levels_from_definition,
    quantize_scales,
    quantized_bytes,
    requantization_report,
)

TEXT = [
    "Once upon a time there was a little girl named Lily. She loved to play outside.",
    "Tom had a red ball. He liked to throw it to his dog, who ran fast to get it back.",
]

FORMATS = {  # name -> quantize_model options for the bundled model
    "int8": {"bits": 8},
    "nf4": {"bits": 4, "block_size": 4},
    "nf4-dq": {"bits": 4, "block_size": 4, "double_quant": True},
}


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bundled():
    model, tok = peftkit.load_model()
    return model.eval(), tok


@pytest.fixture(scope="module")
def batch(bundled):
    _, tok = bundled
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(TEXT, return_tensors="pt", padding=True)
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = -100
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def quantized(bundled, fmt: str):
    model = copy.deepcopy(bundled[0])
    return quantize_model(model, **FORMATS[fmt])


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def set_lora_weights(model, seed: int = 1):
    """Non-zero, reproducible adapter weights (so that merges and comparisons cannot pass by a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# the formats


def test_nf4_levels_match_the_paper_definition():
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    assert torch.allclose(nf4_levels_from_definition(), levels, atol=1e-6, rtol=0)
    assert levels.numel() == 16 and torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0
    assert int((levels > 0).sum()) == 8 and int((levels < 0).sum()) == 7
    # pinned values (QLoRA appendix / bitsandbytes)
    assert levels[8].item() == pytest.approx(0.07958029955625534, abs=1e-7)
    assert levels[1].item() == pytest.approx(-0.6961928009986877, abs=1e-7)


def test_nf4_block_scales_and_codes():
    torch.manual_seed(0)
    lin = nn.Linear(128, 24)
    q = NF4Linear.from_linear(lin, block_size=32)
    blocks = lin.weight.detach().reshape(-1, 32)
    assert torch.equal(q.absmax, blocks.abs().amax(1))  # one absmax per block of 32 along a row
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (24, 64)  # two codes per byte
    codes = torch.stack([q.weight >> 4, q.weight & 15], dim=-1).reshape(24, 128).long()  # high nibble first
    levels = torch.tensor(NF4_LEVELS)
    normed = blocks / blocks.abs().amax(1, keepdim=True)
    dist = (normed.reshape(24, 128).unsqueeze(-1) - levels).abs()
    chosen = dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, dist.min(-1).values, atol=1e-7)  # every code is the nearest level
    assert torch.allclose(q.dequantize(), levels[codes] * q.absmax.repeat_interleave(32).view(24, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_within_the_format_bounds(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(256, 48).to(dtype)
    w = lin.weight.detach().float()
    q8 = Int8Linear.from_linear(lin)
    s = w.abs().amax(1, keepdim=True) / 127
    assert torch.all((q8.dequantize(torch.float32) - w).abs() <= s / 2 + 1e-6)
    assert torch.allclose(q8.weight_scale, s.squeeze(1))

    q4 = NF4Linear.from_linear(lin, block_size=64)
    c = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (q4.dequantize(torch.float32) - w).reshape(-1, 64).abs()
    assert torch.all(err <= c * NF4_MAX_ERROR + 1e-6)
    assert NF4_MAX_ERROR == pytest.approx((1 - 0.6961928009986877) / 2)  # widest gap: -1 .. -0.696

    dq = NF4Linear.from_linear(lin, block_size=64, double_quant=True)
    c_hat = dq.block_scales()
    dev = (c.squeeze(1) - c.mean())
    group_max = torch.nn.functional.pad(dev.abs(), (0, (-dev.numel()) % 256)).view(-1, 256).amax(1)
    scale_bound = (group_max / 254).repeat_interleave(256)[: dev.numel()]
    assert torch.all((c_hat - c.squeeze(1)).abs() <= scale_bound + 1e-7)
    err = (dq.dequantize(torch.float32) - w).reshape(-1, 64).abs()
    assert torch.all(err <= c * NF4_MAX_ERROR + scale_bound.unsqueeze(1) + 1e-6)
    assert dq.compute_dtype == dtype and dq(torch.randn(2, 256, dtype=dtype)).dtype == dtype


def test_double_quant_of_scales_round_trip():
    scales = torch.rand(1000) * 0.3 + 0.01
    codes, group_scale, offset = quantize_scales(scales)
    assert codes.dtype == torch.int8 and codes.shape == (1000,) and group_scale.shape == (4,)
    back = dequantize_scales(codes, group_scale, offset)
    assert torch.all((back - scales).abs() <= group_scale.repeat_interleave(256)[:1000] / 2 + 1e-7)


def test_storage_is_really_4_and_8_bits():
    lin = nn.Linear(1024, 512, bias=False)
    fp32 = lin.weight.numel() * 4
    assert Int8Linear.from_linear(lin).storage_bytes() == fp32 // 4 + 512 * 4
    assert NF4Linear.from_linear(lin, block_size=64).storage_bytes() == fp32 // 8 + (1024 * 512 // 64) * 4
    dq = NF4Linear.from_linear(lin, block_size=64, double_quant=True)
    assert dq.storage_bytes() < fp32 // 8 * 1.04  # 4.127 bits per weight
    assert not any(p.is_floating_point() for n, p in dq.named_parameters() if n != "bias")


@pytest.mark.parametrize("cls,opts", [(Int8Linear, {}), (NF4Linear, {"block_size": 16}),
                                      (NF4Linear, {"block_size": 16, "double_quant": True})])
def test_forward_and_backward_equal_the_dequantized_linear(cls, opts):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    q = cls.from_linear(lin, **opts)
    w = q.dequantize()
    x = torch.randn(3, 7, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q(x), F.linear(x2, w, lin.bias.detach())
    assert torch.allclose(y, y2, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert not q.weight.requires_grad and q.weight.grad is None and not q.bias.requires_grad


def test_backward_keeps_no_float_weight_alive():
    """Backward re-dequantizes: the autograd graph holds the input, not a dense weight."""
    lin = nn.Linear(256, 256, bias=False)
    q = NF4Linear.from_linear(lin, block_size=64)
    x = torch.randn(4, 256, requires_grad=True)
    y = q(x)
    saved = []
    fn = y.grad_fn
    for name in dir(fn):
        if name.startswith("_saved_"):
            value = getattr(fn, name)
            if isinstance(value, torch.Tensor):
                saved.append(value)
    assert not any(t.shape == (256, 256) for t in saved)
    y.sum().backward()
    assert x.grad is not None


def test_casting_the_model_keeps_float32_scales():
    q = NF4Linear.from_linear(nn.Linear(64, 8), block_size=16)
    absmax = q.absmax.clone()
    q.half()
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, absmax)
    assert q.weight.dtype == torch.uint8 and q.bias.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# quantize_model and bad input


def test_quantize_model_replaces_every_linear_but_the_head(bundled, batch):
    model = quantized(bundled, "nf4")
    quant = {k for k, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quant) == 5 * 7
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert rel(logits(model, batch), logits(bundled[0], batch)) < 0.15
    skipped = quantize_model(copy.deepcopy(bundled[0]), bits=4, skip_modules=["down_proj", "layers.0"])
    kinds = {k: type(m) for k, m in skipped.named_modules()}
    assert kinds["model.layers.1.mlp.down_proj"] is nn.Linear and kinds["model.layers.0.self_attn.q_proj"] is nn.Linear
    assert kinds["model.layers.1.self_attn.q_proj"] is NF4Linear
    model8 = quantized(bundled, "int8")
    assert rel(logits(model8, batch), logits(bundled[0], batch)) < 0.03
    numel = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    rows = sum(m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    assert quantized_bytes(model8) == numel + 4 * rows  # int8 codes + one float32 scale per row
    assert quantized_bytes(model) == numel // 2 + 4 * numel // 4  # 4-bit codes + one scale per block of 4


def test_bad_input_raises_before_any_change(bundled):
    model = copy.deepcopy(bundled[0])
    before = {k: type(m) for k, m in model.named_modules()}
    with pytest.raises(PeftkitError, match="bits must be 4"):
        quantize_model(model, bits=3)
    with pytest.raises(PeftkitError, match="bits must be 4"):
        quantize_model(model, bits=True)
    with pytest.raises(PeftkitError, match="does not divide the row length in_features=172"):
        quantize_model(model, bits=4, block_size=64)  # down_proj rows are 172 long
    with pytest.raises(PeftkitError, match="even integer"):
        quantize_model(model, bits=4, block_size=5)
    with pytest.raises(PeftkitError, match="double_quant"):
        quantize_model(model, bits=8, double_quant=True)
    with pytest.raises(PeftkitError, match="compute_dtype"):
        quantize_model(model, bits=8, compute_dtype=torch.int8)
    assert {k: type(m) for k, m in model.named_modules()} == before
    quantize_model(model, bits=8)
    with pytest.raises(PeftkitError, match="already quantized"):
        quantize_model(model, bits=4, block_size=4)
    bad = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    bad[0].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int32), requires_grad=False)
    with pytest.raises(PeftkitError, match="dtype torch.int32"):
        quantize_model(bad, bits=8)
    assert type(bad[2]) is nn.Linear
    nan = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        nan[0].weight[0, 0] = float("nan")
    with pytest.raises(PeftkitError, match="NaN"):
        quantize_model(nan, bits=8)
    with pytest.raises(PeftkitError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), bits=8)


# ---------------------------------------------------------------------------------------------
# adapters over a quantized base


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_over_quantized_equals_float_reference(bundled, batch, fmt, use_dora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    qmodel = get_peft_model(quantized(bundled, fmt), config)
    assert all(isinstance(layer.base_layer, QuantizedLinear) for _, layer in qmodel._layers())
    set_lora_weights(qmodel)
    # exact reference: a float model holding the dequantized weights, same adapter
    exact = get_peft_model(dequantize_model(quantized(bundled, fmt)), config)
    set_lora_weights(exact)
    assert torch.allclose(logits(qmodel, batch), logits(exact, batch), atol=2e-5, rtol=1e-5)
    # the float base with the same adapter: equal up to the quantization error
    ref = get_peft_model(copy.deepcopy(bundled[0]), config)
    set_lora_weights(ref)
    if use_dora:  # DoRA's magnitude is initialised from the (quantized) base norms; use the same one
        for (_, a), (_, b) in zip(qmodel._layers(), ref._layers()):
            b.lora_magnitude_vector["default"].weight.data.copy_(a.lora_magnitude_vector["default"].weight)
    tol = 0.05 if fmt == "int8" else 0.25
    assert rel(logits(qmodel, batch), logits(ref, batch)) < tol


def test_lora_over_nf4_trains_only_the_adapter(bundled, batch):
    model = get_peft_model(quantized(bundled, "nf4-dq"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_prepare_model_for_kbit_training_checkpointing_gives_the_same_gradients(bundled, batch):
    def grads(gc: bool):
        model = quantized(bundled, "nf4")
        if gc:
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
            assert model.is_activation_checkpointing
            assert not any(p.requires_grad for p in model.parameters())
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        set_lora_weights(peft)
        peft.train()
        peft(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}

    with_gc, without = grads(True), grads(False)
    assert with_gc.keys() == without.keys()
    for name in without:
        assert torch.allclose(with_gc[name], without[name], atol=1e-5, rtol=1e-4), name


def test_prepare_model_for_kbit_training_freezes_and_upcasts():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    quantize_model(model, bits=8, skip_modules=["1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PeftkitWarning, match="no gradient checkpointing"):
            prepare_model_for_kbit_training(model)
    assert model[1].weight.dtype == torch.float32 and not model[1].weight.requires_grad
    assert model[0].compute_dtype == torch.bfloat16 and model[0].bias.dtype == torch.float32


def test_qpissa_init_requantizes_the_residual(bundled, batch):
    model = get_peft_model(quantized(bundled, "int8"), LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights="pissa"))
    # base residual (requantized) + principal components ≈ the int8 model's function
    assert rel(logits(model, batch), logits(quantized(bundled, "int8"), batch)) < 0.02


@pytest.mark.skipif(importlib.util.find_spec("peftkit.methods.ia3") is None, reason="IA3 not in this checkout")
def test_ia3_over_quantized(bundled, batch):
    from peftkit import IA3Config

    qmodel = get_peft_model(quantized(bundled, "nf4"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                 feedforward_modules=["down_proj"]))
    exact = get_peft_model(dequantize_model(quantized(bundled, "nf4")), IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    gen = torch.Generator().manual_seed(0)
    for m in (qmodel, exact):
        gen.manual_seed(0)
        with torch.no_grad():
            for n, p in sorted(m.named_parameters()):
                if "ia3_" in n:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    expected = logits(qmodel, batch)
    assert torch.allclose(expected, logits(exact, batch), atol=2e-5, rtol=1e-5)
    assert isinstance(qmodel.base_model.model.model.layers[0].self_attn.k_proj.base_layer, QuantizedLinear)
    merged = qmodel.merge_and_unload(dequantize=True)  # float model: IA3 vectors folded into Ŵ
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    assert torch.allclose(logits(merged, batch), expected, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# saving, loading, merging


def test_adapter_from_quantized_base_is_an_ordinary_folder(bundled, batch, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    qmodel = get_peft_model(quantized(bundled, "nf4"), config)
    set_lora_weights(qmodel)
    qmodel.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(".lora_" in k for k in keys)  # adapter tensors only, no quantized base
    again = PeftModel.from_pretrained(quantized(bundled, "nf4"), tmp_path)
    assert torch.equal(logits(again, batch), logits(qmodel, batch))
    on_float = PeftModel.from_pretrained(copy.deepcopy(bundled[0]), tmp_path)
    ref = get_peft_model(copy.deepcopy(bundled[0]), config)
    set_lora_weights(ref)
    assert torch.allclose(logits(on_float, batch), logits(ref, batch), atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unload_dequantize_is_exact(bundled, batch, use_dora):
    qmodel = get_peft_model(quantized(bundled, "nf4"), LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    set_lora_weights(qmodel)
    expected = logits(qmodel, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is requantized, so nothing to report
        merged = qmodel.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    assert not hasattr(merged, "peftkit_quantization")
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(logits(merged, batch), expected, atol=2e-4, rtol=1e-4)  # float rounding only


@pytest.mark.parametrize("fmt", ["int8", "nf4-dq"])
def test_merge_into_quantized_weights_requantizes_and_reports(bundled, batch, fmt):
    qmodel = get_peft_model(quantized(bundled, fmt), LoraConfig(r=4, target_modules="all-linear"))
    set_lora_weights(qmodel)
    expected = logits(qmodel, batch)
    with torch.no_grad():
        exact = {k: layer.get_base_layer().dequantize(torch.float32) + layer.delta_weight("default")
                 for k, layer in qmodel._layers()}
    with pytest.warns(PeftkitWarning, match=r"requantizing 35 layers introduced an error of max"):
        merged = qmodel.merge_and_unload()
    modules = dict(merged.named_modules())
    for key, target in exact.items():
        q = modules[key]
        assert isinstance(q, QuantizedLinear)
        err = q.dequantize(torch.float32) - target
        assert q.requantization_error["max_abs"] == pytest.approx(float(err.abs().max()), rel=1e-5)
        assert q.requantization_error["rel"] == pytest.approx(float(err.norm() / target.norm()), rel=1e-4)
    assert requantization_report(merged) is None  # reported once
    tol = 0.05 if fmt == "int8" else 0.25
    assert rel(logits(merged, batch), expected) < tol


def test_merge_adapter_then_unmerge_on_quantized_base(bundled, batch):
    qmodel = get_peft_model(quantized(bundled, "int8"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    set_lora_weights(qmodel)
    expected = logits(qmodel, batch)
    base = logits(quantized(bundled, "int8"), batch)
    qmodel.merge_adapter()
    assert rel(logits(qmodel, batch), expected) < 0.02
    report = requantization_report(qmodel, warn=False)
    assert report["layers"] == 10 and report["max_rel"] < 0.02
    with qmodel.disable_adapter():  # unmerges (requantizing again)
        assert rel(logits(qmodel, batch), base) < 0.02
    assert rel(logits(qmodel, batch), expected) < 0.02


def test_bitsandbytes_weights_cannot_be_requantized():
    from peftkit.quant import requantize_weight_

    with pytest.raises(MergeError, match="dequantize=True"):
        requantize_weight_(nn.Linear(4, 4), torch.zeros(4, 4))


# ---------------------------------------------------------------------------------------------
# load_quantized


@pytest.mark.parametrize("fmt", ["int8", "nf4-dq"])
def test_load_quantized_equals_quantize_model(bundled, batch, fmt):
    opts = dict(FORMATS[fmt])
    loaded = load_quantized(peftkit.model_path(), **opts)
    reference = quantized(bundled, fmt)
    sd_a, sd_b = loaded.state_dict(), reference.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied as in the folder
    assert torch.equal(logits(loaded, batch), logits(reference, batch))
    assert loaded.peftkit_quantization["bits"] == opts["bits"]
    assert not loaded.training


def test_load_quantized_bad_input(tmp_path):
    with pytest.raises(PeftkitError, match="no config.json"):
        load_quantized(tmp_path, bits=4)
    with pytest.raises(PeftkitError, match="bits must be 4"):
        load_quantized(peftkit.model_path(), bits=2)
    with pytest.raises(PeftkitError, match="does not divide"):
        load_quantized(peftkit.model_path(), bits=4, block_size=64)
    (tmp_path / "config.json").write_text((peftkit.model_path() / "config.json").read_text())
    with pytest.raises(PeftkitError, match="safetensors"):
        load_quantized(tmp_path, bits=8)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(PeftkitError, match="not a readable safetensors"):
        load_quantized(tmp_path, bits=8)


def test_save_quantized_round_trip_after_merging(bundled, batch, tmp_path):
    from peftkit.quant import save_quantized

    qmodel = get_peft_model(quantized(bundled, "nf4-dq"), LoraConfig(r=4, target_modules="all-linear"))
    set_lora_weights(qmodel)
    with pytest.warns(PeftkitWarning, match="requantizing"):
        merged = qmodel.merge_and_unload()
    save_quantized(merged, tmp_path)
    loaded = load_quantized(tmp_path, bits=8)  # the folder's own format wins
    assert isinstance(loaded.model.layers[0].mlp.down_proj, NF4Linear)
    assert loaded.model.layers[0].mlp.down_proj.double_quant
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, batch), logits(merged, batch))
    with pytest.raises(PeftkitError, match="without adapter layers"):
        save_quantized(get_peft_model(quantized(bundled, "int8"), LoraConfig(r=2, target_modules=["q_proj"])),
                       tmp_path / "x")
    with pytest.raises(PeftkitError, match="no peftkit quantized layer"):
        save_quantized(copy.deepcopy(bundled[0]), tmp_path / "y")
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):  # transformers finds no weights it could misread as floats
        AutoModelForCausalLM.from_pretrained(tmp_path)
