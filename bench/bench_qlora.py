"""QLoRA quality on the bundled model: eval loss of a float, int8 and NF4 base, before and after the
same ``peftkit train`` run on each.

    python bench/bench_qlora.py [--jobs 2] [--threads 1] [--json rows.json]

Each setting is the demo run ``peftkit train`` does with no arguments (the bundled stories260k Llama,
the bundled E2E NLG data, the settings of peftkit/assets/data/demo.yaml: LoRA on all linear layers),
plus ``--quantize`` for the quantized bases, run through the toolkit's Python API
(``train(RunConfig.from_dict(...))``, what the command runs), one child process per setting. The
eval loss "before" is the toolkit's eval of the base (quantized where it is) before the first step;
"after" is the same eval after the last step. Same data, batches, seed and schedule for all.

NF4 needs a block size dividing every quantized row. The bundled model's rows are 64 (attention,
gate/up) and 172 (down_proj) long, so NF4 runs with blocks of 4 on every linear layer (also with
double quantization), and with the usual blocks of 64 keeping down_proj in float32.

There is no peer here: Hugging Face PEFT's QLoRA needs bitsandbytes on CUDA. Figures:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

SETTINGS = {  # label -> extra train settings
    "float32": {},
    "int8": {"quantize": 8},
    "NF4, block 4": {"quantize": 4, "quant_block_size": 4},
    "NF4, block 4, double quant": {"quantize": 4, "quant_block_size": 4, "double_quant": True},
    "NF4, block 64, down_proj fp32": {"quantize": 4, "quant_block_size": 64, "quant_skip_modules": ["down_proj"]},
}


def linear_bytes(model) -> int:
    """Bytes of the frozen base weights of the linear layers that can be quantized (the head excluded)."""
    import torch

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


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from peftkit.train import RunConfig, train
    from peftkit.train import loop
    from peftkit.train.config import demo_settings

    seen = {}
    orig_fit = loop.Trainer.fit

    def fit(self, *a, **k):  # the model as trained: measure its base weights
        seen["linear_bytes"] = linear_bytes(self.model)
        return orig_fit(self, *a, **k)

    loop.Trainer.fit = fit
    settings = {k: v for section in demo_settings().values() for k, v in section.items()}  # flat keys
    settings.update({"output_dir": spec["output_dir"], "progress": False, **spec["extra"]})
    t = time.perf_counter()
    result = train(RunConfig.from_dict(settings), quiet=True)
    return {"before": result.metrics_before, "after": result.metrics_after, "seconds": time.perf_counter() - t,
            "steps": result.steps, "linear_bytes": seen["linear_bytes"]}


def run_one(label: str, extra: dict, opts, workdir: str) -> dict:
    spec = {"extra": extra, "threads": opts.threads,
            "output_dir": os.path.join(workdir, label.replace(" ", "_").replace(",", ""))}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"label": label, "error": (out.stdout + out.stderr).strip().splitlines()[-1]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["label"] = label
    print(f"# {label}: eval loss {row['before']['eval_loss']:.4f} -> {row['after']['eval_loss']:.4f} "
          f"({row['seconds']:.0f} s)", file=sys.stderr)
    return row


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="settings run at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", help="also write the rows to this file")
    opts = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(opts.jobs) as pool:
        rows = list(pool.map(lambda item: run_one(item[0], item[1], opts, workdir), SETTINGS.items()))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{opts.threads} thread(s) per run, {opts.jobs} run(s) at once; `peftkit train` demo settings "
          f"({rows[0].get('steps')} steps)\n")
    ref = rows[0]
    print("| base | eval loss before | Δ vs float | eval loss after | Δ vs float | ROUGE-L after | "
          "linear base weights (bytes / fp32) | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | error: {r['error']} | | | | | | |")
            continue
        b, a = r["before"]["eval_loss"], r["after"]["eval_loss"]
        rouge = r["after"].get("eval_rouge_l")
        print(f"| {r['label']} | {b:.4f} (ppl {math.exp(b):.2f}) | {b - ref['before']['eval_loss']:+.4f} | "
              f"{a:.4f} (ppl {math.exp(a):.2f}) | {a - ref['after']['eval_loss']:+.4f} | "
              f"{'' if rouge is None else f'{rouge:.3f}'} | {r['linear_bytes'] / ref['linear_bytes']:.3f} | "
              f"{r['seconds']:.0f} |")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
