"""Post-training int8 dynamic quantization for CPU inference: size on disk, forward latency and logit
error, float32 against peftkit's int8 (torchao) and the deprecated ``torch.ao.quantization.quantize_dynamic``.

    python bench/bench_ptq.py [--threads 1] [--rounds 15] [--compile] [--only bundled,mid] [--json rows.json]

Models and batches:
* ``bundled``: the bundled stories260k Llama (hidden 64, 5 layers), a batch of 8 bundled E2E eval
  texts padded / cut to 128 tokens;
* ``mid``: a random Llama (seed 0) with hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000,
  8 x 128 random tokens.

Variants: ``float32``; ``int8`` (``peftkit.quant.dynamic.quantize_dynamic_int8``: torchao int8 weights
per channel, int8 activations per token, the head in float); ``int8, head too`` where the head is not
tied to the embeddings (``skip_modules=()``; ``mid``: the head is a third of the matmul work and,
with the embeddings, most of the bytes); ``torch.ao`` (the older eager API on
the same linears, fbgemm kernels: the peer, deprecated since torch 2.10's warning); with
``--compile`` also ``torch.compile`` of float32 and int8 (its compile time is printed). The
latency is the median of ``--rounds`` forward passes per variant, the variants interleaved round by
round (so a noisy neighbour slows each alike), after two warm-up passes each, under
``torch.inference_mode``. Size on disk: ``save_pretrained``'s model.safetensors (float), peftkit's
int8 folder's model.safetensors, and ``torch.save`` of the torch.ao state dict (packed fbgemm
parameters: a pickle only ``weights_only=False`` reads). The logit error is ‖Δ‖/‖float‖ over the
batch's non-padding positions, and the top-1 agreement with float.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def bundled_case():
    import peftkit
    from peftkit.train.data import bundled_data, read_records

    model, tok = peftkit.load_model()
    tok.pad_token = tok.eos_token
    texts = [f"{r['source']}\n{r['target']}" for r in read_records(bundled_data()[1])[:8]]
    enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=128)
    return model.eval(), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mid_case():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=1376, vocab_size=32000, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 32000, (8, 128), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CASES = {"bundled": bundled_case, "mid": mid_case}


def torch_ao(model):
    """The peer: torch.ao's eager dynamic quantization of the same linears (head kept in float)."""
    from torch.ao.quantization import quantize_dynamic

    names = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation warnings
        return quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)


def sizes(models: dict) -> dict[str, int]:
    from peftkit.quant.dynamic import save_dynamic_int8

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        models["float32"].save_pretrained(os.path.join(tmp, "float"))
        out["float32"] = os.path.getsize(os.path.join(tmp, "float", "model.safetensors"))
        for i, k in enumerate(k for k in models if k.startswith("int8") and "compile" not in k):
            save_dynamic_int8(models[k], os.path.join(tmp, f"int8-{i}"))
            out[k] = os.path.getsize(os.path.join(tmp, f"int8-{i}", "model.safetensors"))
    buf = io.BytesIO()
    torch.save(models["torch.ao"].state_dict(), buf)
    out["torch.ao"] = buf.tell()
    return out


def timings(models: dict, batch: dict, rounds: int) -> dict[str, float]:
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(**batch)
            m(**batch)
        for _ in range(rounds):
            for k, m in models.items():
                start = time.perf_counter()
                m(**batch)
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def errors(models: dict, batch: dict) -> dict[str, dict[str, float]]:
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        ref = models["float32"](**batch).logits[mask].float()
        out = {}
        for k, m in models.items():
            y = m(**batch).logits[mask].float()
            out[k] = {"rel_err": float((y - ref).norm() / ref.norm()),
                      "top1": float((y.argmax(-1) == ref.argmax(-1)).float().mean())}
    return out


def run_case(name: str, rounds: int, compile_: bool) -> dict:
    from peftkit.quant.dynamic import quantize_dynamic_int8

    model, batch = CASES[name]()
    int8 = copy.deepcopy(model)
    quantize_dynamic_int8(int8)
    models = {"float32": model, "int8": int8}
    if model.lm_head.weight is not model.get_input_embeddings().weight:  # an untied head can be int8 too
        models["int8, head too"] = copy.deepcopy(model)
        quantize_dynamic_int8(models["int8, head too"], skip_modules=())
    models["torch.ao"] = torch_ao(model)
    compile_s = {}
    if compile_:
        for k in ("float32", "int8"):
            compiled = torch.compile(models[k])
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(**batch)
            compile_s[k + "+compile"] = time.perf_counter() - start
            models[k + "+compile"] = compiled
    lat = timings(models, batch, rounds)
    err = errors(models, batch)
    size = sizes(models)
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "batch": list(batch["input_ids"].shape), "threads": torch.get_num_threads(), "rounds": rounds,
            "latency_s": lat, "size_bytes": size, "errors": err, "compile_s": compile_s}


def print_row(row: dict) -> None:
    lat, size, err = row["latency_s"], row["size_bytes"], row["errors"]
    print(f"\n== {row['model']} ({row['parameters']:,} parameters), batch {'x'.join(map(str, row['batch']))}, "
          f"{row['threads']} thread(s), median of {row['rounds']}")
    print(f"   {'variant':<16}{'latency ms':>12}{'vs float':>10}{'size MB':>10}{'vs float':>10}{'rel err':>10}"
          f"{'top-1':>8}")
    for k, t in lat.items():
        s = size.get(k)
        s_text = f"{s / 2**20:10.2f}{s / size['float32']:10.2f}" if s else f"{'':>20}"
        print(f"   {k:<16}{t * 1e3:12.1f}{lat['float32'] / t:9.2f}x{s_text}{err[k]['rel_err']:10.4f}"
              f"{err[k]['top1']:8.3f}")
    for k, s in row["compile_s"].items():
        print(f"   compile time {k}: {s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=15, help="timed forward passes per variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd float32 and int8")
    parser.add_argument("--only", default="bundled,mid", help="comma-separated cases: bundled, mid")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torchao
    import transformers

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, transformers {transformers.__version__}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    rows = []
    for name in args.only.split(","):
        row = run_case(name.strip(), args.rounds, args.compile)
        print_row(row)
        rows.append(row)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
