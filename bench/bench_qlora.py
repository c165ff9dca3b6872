"""QLoRA quality on the bundled model: eval loss of a float, int8 and NF4 base, before and after the
same LoRA fine-tune on each.

    python bench/bench_qlora.py [--steps 150] [--batch 8] [--seq 128]

Model: the bundled stories260k Llama (hidden 64, intermediate 172). Data: TinyStories validation
head (../shared/data/tinystories/tinystories_val_head.txt; the script exits cleanly if it is
missing), tokenized as one stream and cut into blocks of ``--seq`` tokens: the last 64 blocks are
the eval set, training draws batches from the rest. Each base gets LoRA r=8 (alpha 16) on all
linear layers and the same AdamW run (same seed, same batches). NF4 needs a block size dividing
every row: the MLP's down_proj rows are 172 long, so NF4 is run with block 64 and down_proj kept in
float32, and with block 4 on every linear layer (also with double quantization).

This uses a plain training loop, not ``peftkit train`` (the CLI is built separately). There is no
peer here: Hugging Face PEFT's QLoRA needs bitsandbytes on CUDA. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

THREADS = 1  # the model is tiny: one thread is faster, and steadier on a shared machine
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_val_head.txt"
SETTINGS = {  # name -> quantize_model options (None: float32 base)
    "float32": None,
    "int8": {"bits": 8},
    "nf4 (block 64, down_proj fp32)": {"bits": 4, "block_size": 64, "skip_modules": ["down_proj"]},
    "nf4 (block 4)": {"bits": 4, "block_size": 4},
    "nf4 (block 4, double quant)": {"bits": 4, "block_size": 4, "double_quant": True},
}
EVAL_BLOCKS = 64


def eval_loss(model, blocks: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i:i + batch]
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.numel() - ids.shape[0]  # predicted tokens
            total += loss.item() * n
            count += n
    return total / count


def linear_bytes(model) -> int:
    """Bytes of the base weights of the linear layers that can be quantized (the head excluded)."""
    from peftkit.inject import AdapterLayer
    from peftkit.quant import QuantizedLinear

    total = 0
    for name, m in model.named_modules():
        if name.endswith("lm_head") or isinstance(m, AdapterLayer) or ".lora_" in name:
            continue
        if isinstance(m, QuantizedLinear):
            total += m.storage_bytes()
        elif type(m) is torch.nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    if not os.path.isfile(args.data):
        print(f"skipped: {args.data} not found (the TinyStories sample of ../shared/data)")
        return
    torch.set_num_threads(THREADS)
    import peftkit

    base, tok = peftkit.load_model()
    text = Path(args.data).read_text(encoding="utf-8")
    ids = torch.tensor(tok(text).input_ids)
    blocks = ids[: len(ids) // args.seq * args.seq].view(-1, args.seq)
    eval_blocks, train_blocks = blocks[-EVAL_BLOCKS:], blocks[:-EVAL_BLOCKS]
    order = torch.randint(0, len(train_blocks), (args.steps, args.batch), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, opts in SETTINGS.items():
        model = copy.deepcopy(base)
        if opts is not None:
            peftkit.quantize_model(model, **opts)
        before = eval_loss(model, eval_blocks)
        torch.manual_seed(0)
        pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
        pm.train()
        t = time.perf_counter()
        for step in range(args.steps):
            batch = train_blocks[order[step]]
            loss = pm(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t
        after = eval_loss(pm, eval_blocks)
        qbytes = linear_bytes(pm)
        rows.append((name, before, after, train_s, qbytes))
        print(f"{name}: eval loss {before:.4f} -> {after:.4f} ({train_s:.1f}s)", file=sys.stderr)
    lin_bytes = linear_bytes(base)
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {THREADS} threads; "
          f"{len(train_blocks)} train / {len(eval_blocks)} eval blocks of {args.seq} tokens; LoRA r=8 all-linear, "
          f"{args.steps} steps x batch {args.batch}, AdamW lr {args.lr}\n")
    ref_before, ref_after = rows[0][1], rows[0][2]
    print("| base | eval loss before | Δ vs float | eval loss after LoRA | Δ vs float | train time (s) | "
          "linear base weights (bytes / fp32) |")
    print("|---|---|---|---|---|---|---|")
    for name, before, after, train_s, qbytes in rows:
        frac = f"{qbytes / lin_bytes:.3f}"
        print(f"| {name} | {before:.4f} (ppl {math.exp(before):.2f}) | {before - ref_before:+.4f} | "
              f"{after:.4f} (ppl {math.exp(after):.2f}) | {after - ref_after:+.4f} | {train_s:.1f} | {frac} |")


if __name__ == "__main__":
    main()
