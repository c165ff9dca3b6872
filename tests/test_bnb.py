"""Models quantized by bitsandbytes itself (Linear4bit / Linear8bitLt), on CPU.

bitsandbytes >= 0.46 runs on CPU, so the paths peftkit takes for bitsandbytes modules are tested
here without a GPU: LoRA wraps them (and matches Hugging Face PEFT on the same folder), they train,
``dequantize_weight`` reads them, ``merge_and_unload(dequantize=True)`` gives an exact float model,
merging into their weights is refused, and peftkit's own NF4 buffers feed bitsandbytes' 4-bit
matmul (the CUDA kernel path of ``NF4Linear``) with the same result as peftkit's PyTorch path.
Skipped when bitsandbytes is not installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import peftkit  # noqa: E402
from peftkit import LoraConfig, MergeError, PeftModel, get_peft_model  # noqa: E402
from peftkit.quant import NF4Linear, dequantize_weight, quantize_model  # noqa: E402

from .models import randomize_adapters  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' fp16-cast notices
        yield


def bnb_model(kind: str):
    import transformers

    if kind == "4bit":
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32,
                                              # the MLP's 172-long rows and columns stay float: bitsandbytes'
                                              # CPU kernel on AVX512-BF16 CPUs needs out_features % 32 == 0
                                              llm_int8_skip_modules=["lm_head", "gate_proj", "up_proj", "down_proj"])
    else:
        cfg = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(peftkit.model_path()), quantization_config=cfg,
                                                              device_map="cpu")
    return model.eval()


BNB_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


@pytest.fixture
def ids():
    return torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lora_wraps_bnb_layers_and_matches_hf_peft(kind, ids, tmp_path):
    import peft

    pm = get_peft_model(bnb_model(kind), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__name__ == BNB_CLASS[kind]
    randomize_adapters(pm, std=0.05)
    with torch.no_grad():
        ours = pm(input_ids=ids).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    pm.save_pretrained(tmp_path)
    theirs_model = peft.PeftModel.from_pretrained(bnb_model(kind), str(tmp_path))
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lora_over_bnb_trains_only_the_adapter(kind, ids):
    pm = get_peft_model(bnb_model(kind), LoraConfig(r=4, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in pm.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == ("lora_B" in n or "lora_A" in n), n


def test_dequantize_weight_reads_bnb_modules():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q4 = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    q4.load_state_dict(lin.state_dict())
    q4 = q4.to("cpu")
    w4 = dequantize_weight(q4)
    assert torch.equal(w4, bnb.functional.dequantize_4bit(q4.weight.data, q4.weight.quant_state))
    assert (w4 - lin.weight).abs().max() < 0.25 * lin.weight.abs().max()  # NF4's coarse grid
    q8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    q8.load_state_dict(lin.state_dict())
    q8 = q8.to("cpu")
    w8 = dequantize_weight(q8, torch.float32)
    # int8 per-row absmax: error at most half a step (absmax / 127 / 2) per row
    bound = lin.weight.abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-3
    assert ((w8 - lin.weight).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_merge_and_unload_dequantize_gives_a_float_model(kind, ids):
    pm = get_peft_model(bnb_model(kind), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm, std=0.05)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected_layer = layer(x)
        expected = pm(input_ids=ids).logits
    # on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first no-grad forward and computes in bf16
    bf16_kernel = getattr(layer.get_base_layer().weight, "quant_state", None) is not None and getattr(
        layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)
    with pytest.raises(MergeError, match="dequantize=True"):
        pm.merge_adapter()
    assert not layer.merged  # refused before anything changed
    merged = pm.merge_and_unload(dequantize=True)
    assert not any(type(m).__name__ in BNB_CLASS.values() for m in merged.modules())
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    with torch.no_grad():
        got_layer, got = q(x), merged(input_ids=ids).logits
    if kind == "4bit" and not bf16_kernel:  # bitsandbytes' 4-bit forward is dequantize + matmul: exact
        assert torch.allclose(got_layer, expected_layer, atol=1e-5)
        assert torch.allclose(got, expected, atol=1e-4)
    else:  # LLM.int8 also rounds the activations (to fp16 / int8), the AVX512-BF16 4-bit kernel computes in
        # bf16; the float model does neither
        assert (got_layer - expected_layer).norm() / expected_layer.norm() < 0.02
        assert (got - expected).norm() / expected.norm() < 0.02


def test_peftkit_nf4_buffers_feed_bitsandbytes_matmul():
    """NF4Linear's CUDA path hands its own buffers to ``bitsandbytes.matmul_4bit``: same result as
    peftkit's PyTorch path (run here on CPU), with and without double quantization."""
    for double_quant in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))
        quantize_model(model, bits=4, block_size=64, double_quant=double_quant, skip_modules=["2"])
        layer = model[0]
        assert isinstance(layer, NF4Linear)
        x = torch.randn(5, 128)
        with torch.no_grad():
            reference = layer(x)  # CPU: the PyTorch path
            through_bnb = layer._bnb_forward(x) + layer.bias
        assert torch.allclose(through_bnb, reference, atol=1e-5)


def test_peft_model_loads_on_bnb_base_from_a_float_trained_folder(ids, tmp_path):
    """An adapter trained on the float base loads onto a bitsandbytes-quantized base."""
    base, _ = peftkit.load_model()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm, std=0.05)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(bnb_model("4bit"), str(tmp_path))
    with torch.no_grad():
        a = pm(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    assert (a - b).norm() / a.norm() < 0.2  # same adapter; the base differs by NF4 rounding only


def test_dequantize_weight_reads_the_cpu_repacked_4bit_layout():
    """On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit's weight for its CPU kernel at the first
    no-grad forward (block scales rounded to bf16); dequantize_weight reads that layout too, without
    changing the module. The repacking is forced here, so this runs on any CPU."""
    model = bnb_model("4bit")
    layer = model.model.layers[0].self_attn.q_proj
    before = dequantize_weight(layer).float().clone()
    weight = layer.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    packed = weight.data.clone()
    after = dequantize_weight(layer).float()
    assert torch.equal(weight.data, packed) and weight.quant_state.packing_format_for_cpu  # untouched
    scale = before.abs().max()
    assert (after - before).abs().max() <= scale * 2 ** -8  # the bf16 rounding of the block scales
