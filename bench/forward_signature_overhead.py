"""What ``PeftModel.forward`` carrying the base model's signature costs per call.

``model.forward`` is bound through :class:`peftkit.model_api.BaseSigned` (a ``functools.partial``
subclass, made at each attribute access) so that ``inspect.signature(model.forward)`` is the wrapped
model's. This times ``model(x)`` against calling the plain function on a one-layer LoRA model (the
smallest model, where a per-call cost shows most), and the attribute access alone.

    python bench/forward_signature_overhead.py [--calls 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import peftkit
from peftkit.model import PeftModel


def per_call_us(fn, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        for _ in range(1000):
            fn(x)
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    model = peftkit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peftkit.LoraConfig(target_modules=["0"]))
    x = torch.randn(1, 8)
    plain = PeftModel.forward.__wrapped__ if hasattr(PeftModel.forward, "__wrapped__") else PeftModel.forward
    rows = {
        "model(x)": lambda t: model(t),
        "model.forward(x)": lambda t: model.forward(t),
        "plain function (no signature binding)": lambda t: plain(model, t),
        "attribute access model.forward only": lambda t: model.forward,
    }
    for name, fn in rows.items():
        runs = [per_call_us(fn, x, args.calls) for _ in range(args.repeats)]
        print(f"{name:42s} {min(runs):7.2f} us  (median {statistics.median(runs):.2f})")


if __name__ == "__main__":
    main()
