"""peftkit on CUDA: the same numbers as on CPU, through the public API only.

Run on a machine with a GPU (skipped everywhere else):

    python -m pytest -q tests/test_cuda.py

(a) LoRA / DoRA forward and backward on CUDA equal the CPU result (fp32) on every model kind of
    tests/models.py; merge / unmerge / disable / merge_and_unload on CUDA;
(b) a bf16 base with fp32 adapters: forward and backward close to the fp32 computation on the same
    (bf16-valued) weights, a few AdamW steps reduce the loss, merge_and_unload gives close logits;
(c) mixed-adapter batches (``adapter_names=``) equal each row run with its own adapter alone: one
    adapter per row (gathered batched matmuls), and many rows sharing few adapters in bf16 with
    dims divisible by 8 (``torch.nn.functional.grouped_mm`` where the GPU has it), and generate();
(d) NF4 (``quantize_model(bits=4)``): with bitsandbytes installed the CUDA forward runs its kernel
    and equals ``F.linear(x, layer.dequantize())``; QLoRA on CUDA equals QLoRA on CPU (pure
    PyTorch) and trains;
(e) prompt tuning / prefix tuning ``generate`` on CUDA equals the CPU greedy output on the bundled
    model;
(f) a LoRA / DoRA adapter saved by peftkit loads in Hugging Face ``peft`` on CUDA with the same
    logits (skipped without peft).

Every comparison uses adapters with non-zero, seeded weights, and checks that the adapter changes
the output by much more than the tolerance, so that a no-op cannot pass. Tolerances are relative
to the largest value of the reference: fp32 CUDA vs CPU differ by summation order only (~1e-6;
the bound 1e-3 leaves room for TF32 convolutions), bf16 by its 8-bit mantissa (bound ~3e-2).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import (
    LoraConfig,
    NF4Linear,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    quantize_model,
)

from .models import CASES, randomize_adapters

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = torch.device("cuda")
FP32_TOL = 1e-3  # fp32, CUDA vs CPU or merged vs unmerged: max |a - b| / max |b|
BF16_TOL = 3e-2  # bf16 computation vs its fp32 reference


@pytest.fixture(autouse=True, scope="module")
def _exact_fp32():
    """No TF32 in convolutions (matmuls default to full fp32 already) while these tests run."""
    previous = torch.backends.cudnn.allow_tf32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cudnn.allow_tf32 = False
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes / transformers notices
        yield


# ---------------------------------------------------------------------------------------------
# helpers


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (both in float32, on the CPU)."""
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    return float(F.cosine_similarity(a, ref, dim=0))


def assert_close(a: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel_err(a, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def to_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def llama(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0):
    """A tiny Llama whose matmul dims are multiples of 8 and of NF4's block size 64 (GQA 4/2 heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tokens(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A scalar with a non-trivial gradient everywhere (not the sum: its gradient ignores the output)."""
    return out.float().pow(2).mean()


# ---------------------------------------------------------------------------------------------
# (a) LoRA / DoRA fp32: CUDA equals CPU; merge, unmerge, disable on CUDA

DORA_CASES = {"llama", "gpt2", "t5", "cnn", "mlp"}


def _build(case):
    torch.manual_seed(0)  # MLP / CNN do not seed themselves
    return case.build()


def _lora_case(case, dora: bool):
    if dora and case.name not in DORA_CASES:
        pytest.skip("DoRA is covered on the other model kinds")
    model = _build(case)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, task_type=case.task_type, use_dora=dora)
    pm = get_peft_model(model, cfg)
    randomize_adapters(pm, seed=3, std=0.1)
    return pm.eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_backward_on_cuda_equals_cpu(case, dora):
    cpu = _lora_case(case, dora)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    inputs = case.inputs(3)
    out_cpu = case.output(cpu(**inputs))
    out_gpu = case.output(gpu(**to_device(inputs, DEVICE)))
    assert out_gpu.device.type == DEVICE.type
    assert_close(out_gpu, out_cpu, FP32_TOL, "output")
    with cpu.disable_adapter():
        base_cpu = case.output(cpu(**inputs))
    assert rel_err(out_cpu, base_cpu) > 30 * FP32_TOL  # the adapter matters

    loss_of(out_cpu).backward()
    loss_of(out_gpu).backward()
    grads_cpu, grads_gpu = trainable(cpu), trainable(gpu)
    assert grads_cpu.keys() == grads_gpu.keys() and grads_cpu
    for name, p in grads_cpu.items():
        q = grads_gpu[name]
        assert q.device.type == DEVICE.type
        assert p.grad is not None and q.grad is not None, name
        if p.grad.abs().max() == 0:
            assert q.grad.abs().max() <= 1e-12, name
            continue
        assert_close(q.grad, p.grad, 2 * FP32_TOL, f"grad {name}")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_merge_unmerge_disable_on_cuda(case, dora):
    plain = _build(case).to(DEVICE)  # the same seeded base, no adapter code
    pm = _lora_case(case, dora).to(DEVICE)
    inputs = to_device(case.inputs(3), DEVICE)
    with torch.no_grad():
        base = case.output(plain(**inputs))
        out = case.output(pm(**inputs))
        assert rel_err(out, base) > 30 * FP32_TOL  # the adapter matters
        with pm.disable_adapter():
            assert_close(case.output(pm(**inputs)), base, FP32_TOL, "disabled")
        pm.merge_adapter()
        assert_close(case.output(pm(**inputs)), out, FP32_TOL, "merged")
        with pm.disable_adapter():  # disabling a merged adapter gives the base back
            assert_close(case.output(pm(**inputs)), base, FP32_TOL, "merged, disabled")
        pm.unmerge_adapter()
        assert_close(case.output(pm(**inputs)), out, FP32_TOL, "unmerged")
        merged_model = pm.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged_model.named_parameters())
        assert all(p.device.type == DEVICE.type for p in merged_model.parameters())
        assert_close(case.output(merged_model(**inputs)), out, FP32_TOL, "merge_and_unload")


# ---------------------------------------------------------------------------------------------
# (b) bf16 base, fp32 adapters


def _bf16_lora(dora: bool = False):
    model = llama().to(torch.bfloat16)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                          use_dora=dora))
    randomize_adapters(pm, seed=5, std=0.05)
    return pm


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_fp32_adapters_forward_backward(dora):
    pm = _bf16_lora(dora)
    adapters = trainable(pm)
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == torch.bfloat16 for n, p in pm.named_parameters() if not p.requires_grad)
    # the reference: the same model in fp32 (bf16 base weights are exact in fp32), on the GPU
    ref = copy.deepcopy(pm).float().to(DEVICE)
    pm.to(DEVICE)
    assert all(p.dtype == torch.float32 for p in trainable(pm).values())  # .to(device) keeps fp32 adapters
    ids = tokens(4, 16, 128).to(DEVICE)
    out = pm(input_ids=ids, labels=ids)
    out_ref = ref(input_ids=ids, labels=ids)
    assert out.logits.dtype in (torch.bfloat16, torch.float32)
    assert_close(out.logits, out_ref.logits, BF16_TOL, "bf16 logits")
    assert cosine(out.logits, out_ref.logits) > 0.999
    with torch.no_grad(), ref.disable_adapter():
        base = ref(input_ids=ids).logits
    assert rel_err(out_ref.logits, base) > 5 * BF16_TOL  # the adapter matters at bf16 precision
    out.loss.backward()
    out_ref.loss.backward()
    assert abs(out.loss.item() - out_ref.loss.item()) < 2e-2 * out_ref.loss.item()
    grads, grads_ref = trainable(pm), trainable(ref)
    assert grads.keys() == grads_ref.keys()
    for name, p in grads.items():
        g, g_ref = p.grad, grads_ref[name].grad
        assert g is not None and g.dtype == torch.float32, name
        assert cosine(g, g_ref) > 0.99, f"grad {name}: cosine {cosine(g, g_ref):.4f}"
        assert_close(g, g_ref, 0.1, f"grad {name}")
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)


def test_bf16_base_trains_and_merges():
    pm = _bf16_lora().to(DEVICE)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable(pm).values(), lr=1e-2)
    ids = tokens(4, 32, 128, seed=7).to(DEVICE)
    pm.train()
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in trainable(pm).values())
    pm.eval()
    with torch.no_grad():
        out = pm(input_ids=ids).logits.float()
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits.float()
        merged = pm.merge_and_unload()
        assert next(merged.parameters()).dtype == torch.bfloat16
        merged_out = merged(input_ids=ids).logits.float()
    diff, effect = (merged_out - out).abs().max(), (out - base).abs().max()
    assert diff < 0.25 * effect, f"merge error {diff:.3g} vs adapter effect {effect:.3g}"
    assert_close(merged_out, out, BF16_TOL, "merged bf16")
    assert cosine(merged_out, out) > 0.999


# ---------------------------------------------------------------------------------------------
# (c) mixed-adapter batches


def _multi_adapter(names: list[str], dtype: torch.dtype, adapter_dtype: torch.dtype, ranks=None):
    model = llama().to(dtype)
    ranks = ranks or [8] * len(names)
    pm = get_peft_model(model, LoraConfig(r=ranks[0], lora_alpha=16, target_modules="all-linear",
                                          task_type="CAUSAL_LM"), adapter_name=names[0])
    for name, r in zip(names[1:], ranks[1:]):
        pm.add_adapter(name, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    randomize_adapters(pm, seed=11, std=0.05)
    if adapter_dtype != torch.float32:
        pm.to(adapter_dtype)  # serving: adapters in the base's dtype too
    return pm.to(DEVICE).eval()


def _alone(pm, ids: torch.Tensor, rows_names: list[str]) -> torch.Tensor:
    """Logits of each row run with its own adapter only (rows sharing an adapter run together)."""
    out = None
    for name in dict.fromkeys(rows_names):
        rows = torch.tensor([i for i, n in enumerate(rows_names) if n == name], device=ids.device)
        if name == "__base__":
            with pm.disable_adapter():
                part = pm(input_ids=ids[rows]).logits
        else:
            pm.set_adapter(name)
            part = pm(input_ids=ids[rows]).logits
        if out is None:
            out = torch.empty(ids.shape[0], *part.shape[1:], dtype=part.dtype, device=part.device)
        out[rows] = part
    return out


def _check_mixed(pm, ids, rows_names, tol, min_cos):
    with torch.no_grad():
        mixed = pm(input_ids=ids, adapter_names=rows_names).logits
        alone = _alone(pm, ids, rows_names)
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
    adapted = torch.tensor([n != "__base__" for n in rows_names], device=ids.device)
    assert rel_err(alone[adapted], base[adapted]) > 5 * tol  # the adapters matter
    for i, name in enumerate(rows_names):
        assert_close(mixed[i], alone[i], tol, f"row {i} ({name})")
        assert cosine(mixed[i], alone[i]) > min_cos, f"row {i} ({name})"


def test_mixed_batch_one_adapter_per_row_fp32():
    names = [f"a{i}" for i in range(7)]
    pm = _multi_adapter(names, torch.float32, torch.float32, ranks=[2, 4, 8, 16, 4, 8, 6])
    rows = names + ["__base__"]
    _check_mixed(pm, tokens(len(rows), 12, 128, seed=2).to(DEVICE), rows, FP32_TOL, 0.99999)
    # rows in another order and repeated adapters
    rows = ["a3", "__base__", "a0", "a3", "a6", "a1", "a1", "a5"]
    _check_mixed(pm, tokens(len(rows), 12, 128, seed=3).to(DEVICE), rows, FP32_TOL, 0.99999)


def _count_grouped_mm(monkeypatch) -> list[int]:
    """Count calls of torch.nn.functional.grouped_mm (when this torch has it)."""
    calls = [0]
    real = getattr(F, "grouped_mm", None)
    if real is not None:
        def spy(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


def _grouped_mm_expected() -> bool:
    return (hasattr(F, "grouped_mm") and DEVICE.type == "cuda"
            and torch.cuda.get_device_capability(DEVICE) >= (9, 0))


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16-adapters", "fp32-adapters"])
def test_mixed_batch_many_rows_few_adapters_bf16(adapter_dtype, monkeypatch):
    names = ["a", "b", "c"]
    pm = _multi_adapter(names, torch.bfloat16, adapter_dtype)
    g = torch.Generator().manual_seed(4)
    choice = names + ["__base__"]
    rows = [choice[int(i)] for i in torch.randint(0, 4, (32,), generator=g)]
    calls = _count_grouped_mm(monkeypatch)
    _check_mixed(pm, tokens(32, 16, 128, seed=5).to(DEVICE), rows, BF16_TOL, 0.999)
    if adapter_dtype == torch.bfloat16 and _grouped_mm_expected():
        assert calls[0] > 0, "32 rows over 3 adapters in bf16 did not take the grouped_mm path"
    print(f"grouped_mm calls: {calls[0]}")


def test_mixed_batch_one_adapter_per_row_bf16():
    names = [f"a{i}" for i in range(16)]
    pm = _multi_adapter(names, torch.bfloat16, torch.bfloat16)
    _check_mixed(pm, tokens(16, 8, 128, seed=6).to(DEVICE), names, BF16_TOL, 0.999)


def test_mixed_batch_generate_on_cuda():
    names = ["a", "b", "c"]
    pm = _multi_adapter(names, torch.float32, torch.float32)
    rows = ["b", "__base__", "a", "c", "a"]
    ids = tokens(len(rows), 6, 128, seed=8).to(DEVICE)
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    mixed = pm.generate(input_ids=ids, adapter_names=rows, **gen)
    for i, name in enumerate(rows):
        if name == "__base__":
            with pm.disable_adapter():
                alone = pm.generate(input_ids=ids[i:i + 1], **gen)
        else:
            pm.set_adapter(name)
            alone = pm.generate(input_ids=ids[i:i + 1], **gen)
        assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"


# ---------------------------------------------------------------------------------------------
# (d) NF4 / QLoRA


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _bnb_ops(fn) -> tuple[object, set[str]]:
    """Run ``fn`` under the PyTorch profiler; return its result and the bitsandbytes ops it called."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.key for e in prof.key_averages() if e.key.startswith("bitsandbytes::")}


def _nf4_layers(model) -> list[NF4Linear]:
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 8)], ids=["decode", "prefill"])
def test_nf4_cuda_forward_equals_dequantized_matmul(dtype, shape):
    model = quantize_model(llama().to(dtype), bits=4).to(DEVICE)
    layers = _nf4_layers(model)
    assert layers and all(layer.weight.device.type == DEVICE.type for layer in layers)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    g = torch.Generator().manual_seed(0)
    for layer in (layers[0], layers[-1]):  # q_proj of the first block, down_proj of the last
        x = torch.randn(*shape, layer.in_features, generator=g).to(DEVICE, dtype)
        with torch.no_grad():
            y, ops = _bnb_ops(lambda: layer(x))
            w = layer.dequantize(dtype)
            ref = F.linear(x, w, None if layer.bias is None else layer.bias.to(dtype))
        assert y.dtype == dtype and y.device.type == DEVICE.type
        assert_close(y, ref, tol, "NF4 matmul")
        assert cosine(y, ref) > 0.9999
        if _has_bnb() and DEVICE.type == "cuda":
            assert ops, "NF4Linear on CUDA did not call a bitsandbytes kernel although bitsandbytes is installed"
        # the dequantized weight is the same on CPU (pure PyTorch) and CUDA
        assert torch.equal(layer.dequantize(torch.float32).cpu(), copy.deepcopy(layer).cpu().dequantize(torch.float32))
    if not _has_bnb():
        print("bitsandbytes is not installed: checked the pure-PyTorch NF4 path on CUDA only")


def test_qlora_on_cuda_equals_cpu_and_trains():
    model = quantize_model(llama(), bits=4)  # fp32 compute: CUDA (bitsandbytes) and CPU (PyTorch) agree closely
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    randomize_adapters(pm, seed=9, std=0.05)
    gpu = copy.deepcopy(pm).to(DEVICE)
    ids = tokens(4, 16, 128, seed=10)
    out_cpu = pm(input_ids=ids, labels=ids)
    out_gpu, ops = _bnb_ops(lambda: gpu(input_ids=ids.to(DEVICE), labels=ids.to(DEVICE)))
    if _has_bnb() and DEVICE.type == "cuda":
        assert ops, "QLoRA forward on CUDA did not call bitsandbytes"
    assert_close(out_gpu.logits, out_cpu.logits, FP32_TOL, "QLoRA logits")
    out_cpu.loss.backward()
    out_gpu.loss.backward()
    for name, p in trainable(pm).items():
        q = dict(gpu.named_parameters())[name]
        assert_close(q.grad, p.grad, 5 * FP32_TOL, f"grad {name}")
    # a few steps on CUDA: the loss goes down, the quantized weights stay as they were
    codes = {i: layer.weight.detach().clone() for i, layer in enumerate(_nf4_layers(gpu))}
    opt = torch.optim.AdamW(trainable(gpu).values(), lr=1e-2)
    gpu.train()
    ids = ids.to(DEVICE)
    losses = []
    for _ in range(8):
        loss = gpu(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(layer.weight, codes[i]) for i, layer in enumerate(_nf4_layers(gpu)))
    # merge_and_unload(dequantize=True): an exact float model
    gpu.eval()
    with torch.no_grad():
        out = gpu(input_ids=ids).logits
        merged = gpu.merge_and_unload(dequantize=True)
        assert not _nf4_layers(merged)
        assert_close(merged(input_ids=ids).logits, out, FP32_TOL, "dequantized merge")


def test_qlora_bf16_on_cuda_trains():
    pm = get_peft_model(quantize_model(llama().to(torch.bfloat16), bits=4, double_quant=True),
                        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    pm.to(DEVICE).train()
    opt = torch.optim.AdamW(trainable(pm).values(), lr=1e-2)
    ids = tokens(4, 32, 128, seed=12).to(DEVICE)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in trainable(pm).values())
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------------------------------
# (e) soft prompts: generate on CUDA equals CPU greedy output (bundled model)

PROMPTS = ["Once upon a time", "The little dog saw a big red", "Tom"]


def _assert_same_greedy(out_gpu, out_cpu, tol: float = 1e-3) -> None:
    """Same greedy tokens; where they part, only at a near-tie of the CPU logits (float noise can
    pick either of two equal scores). The scores before that point agree."""
    seq_gpu, seq_cpu = out_gpu.sequences.cpu(), out_cpu.sequences
    assert seq_gpu.shape == seq_cpu.shape
    start = seq_cpu.shape[1] - len(out_cpu.scores)
    for row in range(seq_cpu.shape[0]):
        for step, score_cpu in enumerate(out_cpu.scores):
            score_cpu, score_gpu = score_cpu[row].float(), out_gpu.scores[step][row].float().cpu()
            finite = torch.isfinite(score_cpu)
            assert_close(score_gpu[finite], score_cpu[finite], tol, f"row {row} step {step} scores")
            if seq_gpu[row, start + step] != seq_cpu[row, start + step]:
                top2 = score_cpu.topk(2).values
                assert top2[0] - top2[1] < 1e-3 * top2[0].abs().clamp_min(1), (
                    f"row {row}: CUDA and CPU greedy outputs differ at step {step} without a tie")
                break


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_proj"])
def test_soft_prompt_generate_on_cuda_equals_cpu(method):
    model, tok = peftkit.load_model()
    cfg = {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB"),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "prefix_proj": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True,
                                          encoder_hidden_size=32),
    }[method]
    torch.manual_seed(0)
    cpu = get_peft_model(model.eval(), cfg).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    tok.pad_token = tok.unk_token
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    gen = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id, "output_scores": True,
           "return_dict_in_generate": True}
    out_cpu = cpu.generate(**enc, **gen)
    out_gpu = gpu.generate(**to_device(dict(enc), DEVICE), **gen)
    assert out_gpu.sequences.device.type == DEVICE.type
    _assert_same_greedy(out_gpu, out_cpu)
    with cpu.disable_adapter():
        base = cpu.generate(**enc, **gen)
    assert not torch.equal(base.sequences, out_cpu.sequences)  # the prompt matters


# ---------------------------------------------------------------------------------------------
# (f) interop with Hugging Face PEFT on CUDA


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peftkit_adapter_loads_in_hf_peft_on_cuda(dora, tmp_path):
    peft = pytest.importorskip("peft")
    ours = get_peft_model(llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                              use_dora=dora))
    randomize_adapters(ours, seed=13, std=0.05)
    ours.save_pretrained(tmp_path)
    ours.to(DEVICE).eval()
    theirs = peft.PeftModel.from_pretrained(llama().to(DEVICE), str(tmp_path)).eval()
    ids = tokens(3, 10, 128, seed=14).to(DEVICE)
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        b = theirs(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
    assert rel_err(a, base) > 30 * FP32_TOL
    assert_close(a, b, FP32_TOL, "peftkit vs peft logits")
    # and back: the folder peft writes loads in peftkit on CUDA
    theirs.save_pretrained(tmp_path / "hf")
    again = PeftModel.from_pretrained(llama().to(DEVICE), str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, b, FP32_TOL, "peft folder in peftkit")
