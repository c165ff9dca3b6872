"""Every peftkit method on the bundled model and data: size, speed, memory, quality. Regenerates docs/methods.md.

    python bench/bench_methods.py [--steps 60] [--batch-size 16] [--seed 42] [--threads 2] [--out docs/methods.md]
    python bench/bench_methods.py --from-json rows.json   # rewrite the doc from saved rows (--json)

Each method runs in its own child process (``python bench/bench_methods.py --child SPEC``) so that the
peak RSS of that process (``ru_maxrss`` from ``os.wait4``) belongs to that method alone. A PEFT method
is trained through the toolkit's Python API, ``train(RunConfig.from_dict({...}))`` - what ``peftkit
train`` runs - on its defaults: the bundled stories260k model and the bundled demo data (E2E NLG).
Full fine-tuning (peftkit has no "full" method) runs the toolkit's own ``Trainer`` on the plain
model with every parameter trainable, after the same tokenizer / data / model loading steps as
``train`` (``prepare_data``, ``load_model``), so the data, batches, schedule, eval and loss are the same.

Measured per method:

* trainable parameters (the Trainer's count);
* adapter size on disk: bytes of the ``*.safetensors`` files in the saved ``adapter/`` folder (for
  full fine-tuning that folder holds every parameter: the full model's weights);
* step time: median wall time of ``Trainer.train_step`` (one optimizer step: forward, backward,
  clip, AdamW, scheduler) over all steps, timed by wrapping that method in the child;
* peak RSS of the child process;
* eval loss on the bundled eval set before and after training (``metrics_before`` / ``metrics_after``).

Same steps, global batch and seed for every method; learning rates per method family (no tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

# (row label, --method, method settings, lr)
METHODS = [
    ("LoRA (r=8, q/v)", "lora", {"r": 8}, 2e-3),
    ("DoRA (r=8, q/v)", "dora", {"r": 8}, 2e-3),
    ("IA3", "ia3", {}, 3e-2),
    ("prompt tuning (20 tokens)", "prompt-tuning", {"num_virtual_tokens": 20}, 3e-2),
    ("P-tuning (20 tokens)", "p-tuning", {"num_virtual_tokens": 20}, 3e-2),
    ("prefix tuning (20 tokens)", "prefix-tuning", {"num_virtual_tokens": 20}, 3e-2),
    ("bottleneck, houlsby", "bottleneck", {"style": "houlsby"}, 2e-3),
    ("bottleneck, pfeiffer", "bottleneck", {"style": "pfeiffer"}, 2e-3),
    ("bottleneck, parallel", "bottleneck", {"style": "parallel"}, 2e-3),
    ("BitFit", "bitfit", {}, 1e-2),
    ("partial (last 1 of 5 layers)", "partial", {"num_last_layers": 1}, 1e-3),
    ("LN tuning", "ln-tuning", {}, 1e-2),
    ("full fine-tuning (reference)", "full", {}, 1e-4),
]


def safetensors_bytes(folder: str) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".safetensors"):
                total += os.path.getsize(os.path.join(root, n))
    return total


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from peftkit.train import RunConfig, train
    from peftkit.train import loop

    step_times: list[float] = []
    orig = loop.Trainer.train_step

    def timed(self, micro_batches):
        t = time.perf_counter()
        out = orig(self, micro_batches)
        step_times.append(time.perf_counter() - t)
        return out

    loop.Trainer.train_step = timed
    settings = {
        "max_steps": spec["steps"], "batch_size": spec["batch_size"], "lr": spec["lr"], "seed": spec["seed"],
        "output_dir": spec["output_dir"], "progress": False, "eval_steps": 0, "save_steps": 0,
        "num_generations": 0, "eval_generate_samples": 0, "device": "cpu", "max_eval_samples": spec["eval_samples"],
    }
    if spec["method"] == "full":
        result = full_finetune(RunConfig.from_dict(settings))
    else:
        settings["method"] = spec["method"]
        settings.update(spec["args"])
        result = train(RunConfig.from_dict(settings), quiet=True)
    return {
        "trainable": result.report.get("trainable_params"),
        "total": result.report.get("total_params"),
        "adapter_bytes": safetensors_bytes(os.path.join(spec["output_dir"], "adapter")),
        "step_ms": 1000 * statistics.median(step_times) if step_times else None,
        "steps": result.steps,
        "loss_before": result.metrics_before.get("eval_loss"),
        "loss_after": result.metrics_after.get("eval_loss"),
    }


def full_finetune(run):
    """The toolkit's Trainer on the plain model (all parameters trainable), loaded as ``train`` does."""
    import dataclasses

    from peftkit.train.data import prepare_data
    from peftkit.train.distributed import DistInfo
    from peftkit.train.loop import Trainer, set_seed
    from peftkit.train.modeling import default_model_path, load_model, load_tokenizer, task_for

    cfg = run.train
    model_path = default_model_path()
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(run.data, tokenizer, lambda fmt: task_for(fmt, model_path), seed=cfg.seed)
    model = load_model(model_path, data.task_type, dtype=run.model.dtype, pad_token_id=tokenizer.pad_token_id)
    for p in model.parameters():
        p.requires_grad_(True)
    set_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    trainer = Trainer(model, tokenizer, data.train, data.eval, cfg, task_type=data.task_type, dist_info=DistInfo(),
                      output_dir=cfg.output_dir, packing=run.data.packing, max_length=run.data.max_length, quiet=True)
    return trainer.fit()


def run_one(label, method, args, lr, opts, workdir) -> dict:
    spec = {"method": method, "args": args, "lr": lr, "steps": opts.steps, "batch_size": opts.batch_size,
            "seed": opts.seed, "threads": opts.threads, "eval_samples": opts.eval_samples,
            "output_dir": os.path.join(workdir, method + "-" + "-".join(f"{k}{v}" for k, v in args.items())),
            "result": os.path.join(workdir, f"result-{label.replace(' ', '_').replace('/', '_')}.json")}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"label": label, "method": method, "args": args, "lr": lr, "wall_s": time.perf_counter() - t,
           "peak_rss_bytes": usage.ru_maxrss * 1024}  # Linux: KiB
    if proc.returncode == 0 and os.path.isfile(spec["result"]):
        with open(spec["result"]) as f:
            row.update(json.load(f))
    else:
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        row["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
        row["log"] = out[-3000:]
    print(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'log'})}", flush=True)
    return row


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__} CPU")


def table(rows) -> str:
    lines = ["| method | `--method` (settings) | lr | trainable params | adapter on disk | step (ms, median) "
             "| peak RSS | eval loss before | eval loss after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        how = f"`{r['method']}`" + (" (" + ", ".join(f"{k}={v}" for k, v in r["args"].items()) + ")" if r["args"] else "")
        if r["method"] == "full":
            how = "Trainer on the plain model"
        if "error" in r:
            err = r["error"].replace("|", "\\|")
            if "no bias" in err.lower():  # BitFit on a model built without biases: not a failure
                cell = "**n/a**: the model has no bias terms (see below)"
            else:
                cell = f"**failed**: {err}"
            lines.append(f"| {r['label']} | {how} | {r['lr']:g} | {cell} | | | {fmt_bytes(r['peak_rss_bytes'])} | | |")
            continue
        pct = 100 * r["trainable"] / r["total"] if r.get("total") else 0
        lines.append(f"| {r['label']} | {how} | {r['lr']:g} | {r['trainable']:,} ({pct:.2f}%) | "
                     f"{fmt_bytes(r['adapter_bytes'])} | {r['step_ms']:.1f} | {fmt_bytes(r['peak_rss_bytes'])} | "
                     f"{r['loss_before']:.4f} | {r['loss_after']:.4f} |")
    return "\n".join(lines)


READING_MARKER = "<!-- reading: kept by bench_methods.py when it regenerates this file -->"


def write_doc(rows, opts, path: str) -> None:
    """docs/methods.md: header, command, machine, table; the reading below READING_MARKER is kept."""
    reading = "## Reading\n\n(to be written after a run)\n"
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if READING_MARKER in old:
            reading = old.split(READING_MARKER, 1)[1].lstrip("\n")
    failed = [r for r in rows if "error" in r]
    concurrency = ""
    if opts.jobs > 1:
        concurrency = (f" The {len(rows)} methods ran {opts.jobs} processes at a time on the {os.cpu_count()} cores "
                       "(to fit a time budget), so the step times are inflated by that contention and only their "
                       "order of magnitude is meaningful; they were all inflated alike, roughly.")
    text = f"""# Methods compared

One row per peftkit method, trained the way `peftkit train` trains (its Python API,
`train(RunConfig.from_dict({{...}}))`) on its defaults: the bundled stories260k model (Llama, 5 layers,
hidden 64, tied embeddings) and the bundled demo data (E2E NLG, 800 train / 100 eval examples).
Every method: {opts.steps} optimizer steps, global batch {opts.batch_size}, seed {opts.seed}, the default schedule
(5% warmup, linear decay, AdamW, clipping at 1.0), fp32, `torch.set_num_threads({opts.threads})`; only the
learning rate differs by method family (chosen once, not tuned). Method settings not shown are the
method's defaults (LoRA/DoRA: r=8 on the default q/v targets; bottleneck: reduction factor 16).

Command: `python bench/bench_methods.py --steps {opts.steps} --batch-size {opts.batch_size} --seed {opts.seed} --threads {opts.threads} --eval-samples {opts.eval_samples} --jobs {opts.jobs}`
(it rewrites this file; the reading section at the end is kept).

Machine: {machine()}. The machine was shared with other jobs, so the step times are indicative only;
peak RSS is not affected by that.{concurrency}

How each column is measured:

* **trainable params**: the Trainer's count of `requires_grad` parameters (share of all parameters).
* **adapter on disk**: bytes of the `*.safetensors` files in the saved `adapter/` folder of the run.
  For full fine-tuning that folder holds every parameter, i.e. the full model's weights (the tied
  embedding / LM head stored once).
* **step**: median wall time of one optimizer step (`Trainer.train_step`: forward, backward, clip,
  AdamW, scheduler) over all {opts.steps} steps, timed by wrapping that method in the child process.
* **peak RSS**: each method runs in its own child process; `ru_maxrss` of that child from `os.wait4`.
  It includes Python, torch and transformers (about the same for every row), so differences between
  rows are small on a 260k-parameter model.
* **eval loss**: `metrics_before` / `metrics_after` of the run (token cross-entropy on the bundled eval set).

Full fine-tuning: peftkit has no "full" method, so that row runs the toolkit's own
`peftkit.train.loop.Trainer` on the plain model with every parameter set trainable, after loading
tokenizer, data and model with the same functions `train` uses (`load_tokenizer`, `prepare_data`,
`load_model`) and the same settings, so data, batches, schedule, loss and eval are identical.

{table(rows)}

"""
    if failed:
        text += "Rows without figures, and why:\n\n"
        for r in failed:
            text += f"* {r['label']}: `{r['error']}`\n"
        text += "\n"
    with open(path, "w") as f:
        f.write(text + READING_MARKER + "\n\n" + reading)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=100, help="max_eval_samples (the bundled eval set has 100)")
    ap.add_argument("--jobs", type=int, default=1, help="methods run at once (each its own process); >1 distorts step times")
    ap.add_argument("--only", default=None, help="comma-separated row labels' --method names to run")
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    ap.add_argument("--out", default="docs/methods.md", help="the Markdown file to (re)write; '' for none")
    ap.add_argument("--from-json", default=None, help="rewrite --out from rows saved by --json, without running")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        spec = json.loads(opts.child)
        try:
            res = child(spec)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        with open(spec["result"], "w") as f:
            json.dump(res, f)
        return
    if opts.from_json:
        with open(opts.from_json) as f:
            rows = json.load(f)
        write_doc(rows, opts, opts.out)
        print(table(rows))
        return
    methods = [m for m in METHODS if not opts.only or m[1] in opts.only.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        if opts.jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(opts.jobs) as pool:
                rows = list(pool.map(lambda m: run_one(*m, opts, workdir), methods))
        else:
            rows = [run_one(*m, opts, workdir) for m in methods]
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    print()
    print(f"Machine: {machine()}; torch threads {opts.threads}; {opts.steps} steps, batch {opts.batch_size}, "
          f"seed {opts.seed}")
    print(table(rows))
    for r in rows:
        if "error" in r:
            print(f"\n--- {r['label']} failed ---\n{r['log']}")
    if opts.out and not opts.only:
        write_doc(rows, opts, opts.out)
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
