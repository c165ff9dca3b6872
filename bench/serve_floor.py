"""What transformers alone reaches on bench_serve.py's model and prompts: the bare base model, one batch.

    python bench/serve_floor.py [--requests 256] [--new-tokens 32] [--threads 1] [--repeat 3]

The bare base model (no adapter, no server, no HTTP) generates for all requests at once: one left-padded
batch, ``generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)``, on ``--threads`` (bench_serve.py's
rows a and b compute on cores - 1 = 1 here). Also timed alone: the batch's prompt forward (prefill).
No adapter, no server, no HTTP, no scheduling: a multi-adapter server does this work plus its adapters',
less only the padding it avoids (peftkit's engine prefills rows grouped by length). docs/serving.md
compares it with rows (a) and (b) of bench_serve.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve as bs  # noqa: E402
from serve_model import DEFAULT_OUT, write_bench_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = write_bench_model(DEFAULT_OUT)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(bs.prompt_slice(bs.load_prompts(), 100, args.requests), return_tensors="pt", padding=True)
    print(f"{args.requests} prompts: {int(batch['attention_mask'].sum())} tokens, {batch['input_ids'].numel()} padded; "
          f"{args.threads} thread(s)")
    prefill, total = [], []
    for _ in range(args.repeat):
        with torch.inference_mode():
            start = time.perf_counter()
            model(**batch, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            total.append(time.perf_counter() - start)
    tokens = args.requests * args.new_tokens
    print(f"prefill {statistics.median(prefill):.2f} s (runs {', '.join(f'{t:.2f}' for t in prefill)}); generate "
          f"{statistics.median(total):.2f} s: {tokens / statistics.median(total):.0f} generated tok/s (runs "
          f"{', '.join(f'{tokens / t:.0f}' for t in total)})")


if __name__ == "__main__":
    main()
