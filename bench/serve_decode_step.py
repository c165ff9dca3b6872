"""What one decode step of ``peftkit serve``'s engine costs, without HTTP: the bench model of
bench/serve_model.py with its 32 LoRA adapters installed, B rows spread over K adapters, one token each,
through the engine's RunningBatch (its cache written in place) after a prefill of --prompt-tokens.

    python bench/serve_decode_step.py [--model-dir /tmp/peftkit-serve-bench] [--threads 1] [--prompt-tokens 80]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_model import DEFAULT_OUT, write_bench_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=80, help="prompt length (the E2E prompts: about 80)")
    ap.add_argument("--attention", choices=("decode", "sdpa"), default="decode",
                    help="one-token steps: the engine's decode attention (default) or SDPA")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from peftkit.adapter_io import read_adapter
    from peftkit.core.mixed import mixed_batch
    from peftkit.serve.batch import RunningBatch, build_prefill, use_decode_attention
    from peftkit.serve.host import AdapterHost

    base, adapters = write_bench_model(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if args.attention == "decode":  # what the engine does on CPUs
        use_decode_attention(model)
    host = AdapterHost(model, "base")
    names = sorted(adapters)
    for name in names:
        source, config, weights = read_adapter(adapters[name], None, None, False, None, {})
        host.install(name, config, weights, source)
    prompt = list(range(5, 5 + args.prompt_tokens))
    print(f"decode step, {args.threads} thread(s), {len(names)} adapters installed, {len(prompt)}-token prompts")
    for B in (64, 128, 256):
        for K in (1, 8, 32):
            rows = [names[i % K] for i in range(B)]
            with torch.inference_mode():
                t = time.perf_counter()
                pre = build_prefill(model, [prompt] * B, [None] * B, torch.device("cpu"), torch.float32)
                with mixed_batch(rows, static=True):
                    out = model(**pre.inputs, use_cache=True, logits_to_keep=1)
                prefill = time.perf_counter() - t
                batch = RunningBatch()
                batch.add(rows, pre.inputs["past_key_values"], pre.inputs["attention_mask"])
                t = time.perf_counter()
                for step in range(args.steps):
                    ids = out.logits[:, -1].argmax(-1).tolist()
                    inputs = batch.step_inputs(ids, [len(prompt) + step] * B)
                    with mixed_batch(rows, static=True):
                        out = model(**inputs, use_cache=True)
                dt = (time.perf_counter() - t) / args.steps
            print(f"  {B:4d} rows over {K:2d} adapters: prefill {prefill:5.2f} s, decode {dt * 1000:6.1f} ms per step, "
                  f"{B / dt:6.0f} tokens/s")


if __name__ == "__main__":
    main()
