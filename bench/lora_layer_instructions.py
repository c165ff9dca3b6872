"""CPU instructions per call of one LoRA linear layer, peftkit beside Hugging Face PEFT (Linux ``perf``).

    python bench/lora_layer_instructions.py [--dim 8] [--calls 20000] [--tool perf|callgrind]

On a CPU decode step (a few tokens) the time an unmerged adapter adds is mostly the Python and the
PyTorch call overhead around its two thin matmuls, and timing it is at the mercy of a noisy machine.
Counting instructions is not: the counts repeat to about 0.5%. Each variant runs in its own process
under ``perf stat -e instructions``, counting only the timed calls (``--control``), one thread, no
gradient (``torch.inference_mode``), input (32, 1, dim), rank 16, non-zero B. With the default
``--dim 8`` the arithmetic is negligible and what is left is the per-call cost. Variants:

- ``nn.Linear``: the base layer alone (what the adapter layer replaces);
- ``peftkit``: peftkit's LoRA ``Linear`` wrapping it;
- ``bare ops``: the LoRA math as bare tensor calls in a minimal module (``F.linear``, ``F.linear``,
  ``addmm_`` on 2-D views, Bᵀ made once): this math written in Python the obvious way;
- ``bare 2-D mm``: the tensor calls of peftkit's no-grad road with none of its checks (``mm`` on
  kept transposed views, ``addmm_``, one reshape and one view): the floor for peftkit's layer;
- ``peft``: Hugging Face PEFT's LoRA ``Linear``.

Where ``perf`` cannot count (some VMs answer ``<not supported>``), ``--tool callgrind`` counts with
valgrind instead: each variant runs twice, with ``calls`` and ``6·calls`` timed calls, and the
difference over ``5·calls`` is the count per call (slow: use ``--calls 1000``). Figures and what they
mean for the model-level ratio: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

VARIANTS = ("nn.Linear", "peftkit", "bare ops", "bare 2-D mm", "peft")


def _layer(variant: str, dim: int):
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(dim, dim, bias=False)

        def forward(self, x):
            return self.proj(x)

    if variant == "nn.Linear":
        return Wrap().proj
    cfg = dict(r=16, lora_alpha=32, target_modules=["proj"])
    if variant == "peft":
        import peft

        layer = peft.get_peft_model(Wrap(), peft.LoraConfig(**cfg)).base_model.model.proj
    else:
        import peftkit

        layer = peftkit.get_peft_model(Wrap(), peftkit.LoraConfig(**cfg)).base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    if not variant.startswith("bare"):
        return layer
    from bench_lora import bare_mm, bare_ops  # this script's folder is on sys.path

    bare = nn.Module()
    # called by nn.Module.__call__ like any forward, no extra frame
    bare.forward = (bare_ops if variant == "bare ops" else bare_mm)(layer)
    return bare


def _child(variant: str, dim: int, calls: int, ctl_fd: int) -> None:
    import torch

    torch.set_num_threads(1)
    layer = _layer(variant, dim)
    x = torch.randn(32, 1, dim)
    with torch.inference_mode():
        for _ in range(200):
            layer(x)
        if ctl_fd is not None:
            os.write(ctl_fd, b"enable\n")
        for _ in range(calls):
            layer(x)
        if ctl_fd is not None:
            os.write(ctl_fd, b"disable\n")


def _count(variant: str, dim: int, calls: int) -> float:
    read_fd, write_fd = os.pipe()
    cmd = ["perf", "stat", "-x,", "-e", "instructions", "--control", f"fd:{read_fd}", "-D", "-1",
           sys.executable, __file__, "--child", variant, "--dim", str(dim), "--calls", str(calls),
           "--ctl-fd", str(write_fd)]
    proc = subprocess.run(cmd, pass_fds=(read_fd, write_fd), capture_output=True, text=True)
    os.close(read_fd), os.close(write_fd)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: {proc.stderr.strip()[-800:]}")
    for line in proc.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("instructions"):
            return int(fields[0]) / calls
    raise SystemExit(f"{variant}: no instruction count in perf's output:\n{proc.stderr[-800:]}")


def _count_callgrind(variant: str, dim: int, calls: int) -> float:
    totals = []
    for n in (calls, 6 * calls):
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--child", variant, "--dim", str(dim), "--calls", str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        refs = [line for line in proc.stderr.splitlines() if "I   refs:" in line]
        if proc.returncode != 0 or not refs:
            raise SystemExit(f"{variant}: {proc.stderr.strip()[-800:]}")
        totals.append(int(refs[-1].split(":")[-1].replace(",", "")))
    return (totals[1] - totals[0]) / (5 * calls)


def _perf_counts() -> bool:
    if shutil.which("perf") is None:
        return False
    proc = subprocess.run(["perf", "stat", "-x,", "-e", "instructions", "true"], capture_output=True, text=True)
    return proc.returncode == 0 and "not supported" not in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=8, help="in = out features (default 8: arithmetic negligible)")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--tool", choices=("perf", "callgrind"), default=None,
                        help="how to count (default: perf where it counts, else callgrind)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--ctl-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.dim, args.calls, args.ctl_fd)
        return
    tool = args.tool or ("perf" if _perf_counts() else "callgrind")
    if tool == "perf" and shutil.which("perf") is None:
        raise SystemExit("--tool perf needs Linux `perf` (perf stat) on PATH.")
    if tool == "callgrind" and shutil.which("valgrind") is None:
        raise SystemExit("--tool callgrind needs valgrind on PATH.")
    count = _count if tool == "perf" else _count_callgrind
    counts = {v: count(v, args.dim, args.calls) for v in VARIANTS}
    base = counts["nn.Linear"]
    print(f"# instructions per call ({tool}), input (32, 1, {args.dim}), r=16, {args.calls} calls, 1 thread, "
          "inference mode")
    print("| variant | instructions / call | added over nn.Linear |")
    print("|---|---|---|")
    for v, n in counts.items():
        print(f"| {v} | {n / 1e3:.1f}K | {(n - base) / 1e3:+.1f}K |")


if __name__ == "__main__":
    main()
