"""Floating-point operations of one training step on the llama100m row of bench_train.py: Hugging Face
PEFT + transformers' flattening collator (the peer) against peftkit's defaults, on the same examples.

    python bench/train_flops.py [--examples 8]

The first ``--examples`` training examples (E2E, prompt masked) make one step on each side: the peer
flattens them into one row (``DataCollatorWithFlattening``) and takes ``model(**batch).loss.backward()``;
peftkit packs them into one row and runs ``Trainer.train_step`` (packing, LM head and loss at target
positions only, fused LoRA, attention per example). A dispatch mode counts the matrix products
(``mm``, ``addmm``, ``bmm``, ``baddbmm``: 2 m k n each) and the attention forward calls
(``4 B H L S D`` per SDPA call; the backward is counted as 2.5 forwards, the usual flash-attention
figure). Counts are exact for the shapes and do not depend on the machine's load. Attention over a
causal segment is counted in full (L x L), which overstates peftkit's side a little.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train_100m as b  # noqa: E402

SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"
BACKWARD_PER_FORWARD = 2.5  # attention backward in forward-FLOPs (dQ, dK, dV, dP and the recomputed scores)


class FlopCount(TorchDispatchMode):
    """FLOPs of the matrix products and attention forward calls run inside it, by operator."""

    def __init__(self) -> None:
        super().__init__()
        self.by: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name == "aten.mm":
            self.by[name] += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif name in ("aten.addmm", "aten.addmm_"):
            self.by["aten.addmm"] += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        elif name == "aten.bmm":
            a = args[0]
            self.by[name] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * args[1].shape[2]
        elif name in ("aten.baddbmm", "aten.baddbmm_"):
            a = args[1]
            self.by["aten.baddbmm"] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * args[2].shape[2]
        elif name == SDPA:
            (B, H, L, D), S = args[0].shape, args[1].shape[-2]
            self.by[SDPA] += 4 * B * H * L * S * D
        return out

    def total(self) -> tuple[float, float]:
        """(matrix products, attention forward + backward) in FLOPs."""
        attention = self.by.get(SDPA, 0) * (1 + BACKWARD_PER_FORWARD)
        return sum(v for k, v in self.by.items() if k != SDPA), attention


def count(step) -> tuple[float, float]:
    mode = FlopCount()
    with mode:
        step()
    return mode.total()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=8, help="examples in the step (default 8, the benchmark's batch)")
    args = ap.parse_args()
    import peft
    import transformers

    import peftkit
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import Trainer

    tok, data = b.load_data(args.examples, 8)
    examples = data.train.examples
    tokens = sum(len(e.input_ids) for e in examples)
    targets = sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    lora = dict(r=16, lora_alpha=16, target_modules=b.LORA_TARGETS)

    peer = peft.get_peft_model(b.build_model(), peft.LoraConfig(task_type="CAUSAL_LM", **lora)).train()
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": e.input_ids, "labels": e.labels}
                                                       for e in examples])
    sides = {"Hugging Face PEFT + flattening collator": count(lambda: peer(**batch).loss.backward())}

    model = peftkit.get_peft_model(b.build_model(), peftkit.LoraConfig(task_type="CAUSAL_LM", **lora))
    cfg = TrainConfig(epochs=1, batch_size=1, progress=False, eval_steps=0, save_steps=0, num_generations=0,
                      eval_generate_samples=0, seed=0)
    trainer = Trainer(model, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", quiet=True,
                      max_length=max(2048, tokens))
    model.train()
    micro = trainer.micro_batches(0)
    if sum(int(m["input_ids"].numel()) for m in micro) != tokens:
        raise SystemExit("peftkit's first step does not hold exactly these examples")
    sides["peftkit defaults"] = count(lambda: trainer.train_step(micro))

    print(f"one step of {len(examples)} examples, {tokens} tokens, {targets} target tokens "
          f"(peftkit: {trainer.batching}; {trainer.segments.describe()})")
    peer_total = sum(sides["Hugging Face PEFT + flattening collator"])
    for name, (products, attention) in sides.items():
        total = products + attention
        print(f"  {name:<40} matrix products {products / 1e9:7.1f} GFLOP, attention {attention / 1e9:6.1f}, "
              f"total {total / 1e9:7.1f} ({total / tokens / 1e6:.0f} MFLOP a token; peer / this: {peer_total / total:.2f})")


if __name__ == "__main__":
    main()
