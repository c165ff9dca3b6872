"""QLoRA memory: whole-process peak RSS of a LoRA training run over an fp32, int8 or NF4 base.

    python bench/bench_qlora_memory.py [--dir /tmp/peftkit-bench/llama300m] [--settings fp32,int8,nf4]
                                       [--gc off|on|both|recipe] [--steps 3]

Model: a Llama of ~323M parameters (hidden 1024, 20 layers, intermediate 2816, vocab 32000, 16
heads, untied head), random weights saved once as a safetensors folder (``--dir``). Each setting
runs in its own process with 2 CPU threads: load the folder (fp32: ``from_pretrained``; int8 / NF4:
``peftkit.load_quantized``, quantizing layer by layer as it reads), add LoRA r=16 on all linear
layers, run ``--steps`` AdamW steps at batch 4 x 128. The parent reads each child's peak RSS from
``os.wait4`` (``ru_maxrss``; the child also reports ``resource.getrusage``) and prints a Markdown
table with the ratios to the fp32 run. ``--gc on`` turns on gradient checkpointing (re-entrant, as
``prepare_model_for_kbit_training`` does) in every setting, so ratios compare like with like;
``--gc both`` runs every setting without and with it. ``--gc recipe`` compares the QLoRA recipe with
plain LoRA: the quantized runs call ``peftkit.prepare_model_for_kbit_training(model)`` (its default
turns gradient checkpointing on, as in Hugging Face PEFT), the fp32 run adds LoRA to the model as
loaded. There is no peer here: Hugging Face PEFT's
QLoRA needs bitsandbytes on CUDA. Figures: docs/benchmarks.md ("QLoRA").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

THREADS = 2
BATCH, SEQ = 4, 128


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, num_hidden_layers=20, intermediate_size=2816, vocab_size=32000,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                       tie_word_embeddings=False)


def make_folder(folder: str) -> None:
    """Random-weight model saved once (runs in a child so the parent stays small)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config())
    model.save_pretrained(folder, safe_serialization=True)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(setting: str, folder: str, steps: int, gc: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    from transformers import AutoModelForCausalLM

    import peftkit

    t = time.perf_counter()
    if setting == "fp32":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    elif setting == "int8":
        model = peftkit.load_quantized(folder, bits=8)
    elif setting == "nf4":
        model = peftkit.load_quantized(folder, bits=4, block_size=64)
    elif setting == "nf4-dq":
        model = peftkit.load_quantized(folder, bits=4, block_size=64, double_quant=True)
    else:
        raise SystemExit(f"unknown setting {setting}")
    load_s = time.perf_counter() - t
    rss_loaded = current_rss_mb()
    peak_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gc == "on":
        model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    elif gc == "recipe" and setting != "fp32":
        peftkit.prepare_model_for_kbit_training(model)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (BATCH, SEQ), generator=gen)
    pm.train()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    print(json.dumps({
        "setting": setting, "load_s": load_s, "step_s": times, "losses": losses,
        "rss_after_load_mb": rss_loaded, "peak_after_load_mb": peak_loaded,
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in trainable),
    }))


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; return its JSON line and its peak RSS (MiB) from wait4."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"})
    out = proc.stdout.read().decode()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/peftkit-bench/llama300m")
    parser.add_argument("--settings", default="fp32,int8,nf4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gc", choices=["off", "on", "both", "recipe"], default="off",
                        help="gradient checkpointing in every setting (on), in none (off), both tables, or the QLoRA "
                             "recipe (prepare_model_for_kbit_training on the quantized runs only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_folder(args.dir)
        return
    if args.child:
        child(args.child, args.dir, args.steps, args.gc)
        return
    if not os.path.isfile(os.path.join(args.dir, "model.safetensors")):
        os.makedirs(args.dir, exist_ok=True)
        info, _ = run_child(["--make", "--dir", args.dir])
        print(f"saved a {info['params'] / 1e6:.1f}M-parameter Llama to {args.dir}", file=sys.stderr)
    for gc in (["off", "on"] if args.gc == "both" else [args.gc]):
        results = {}
        for setting in args.settings.split(","):
            res, peak = run_child(["--child", setting, "--dir", args.dir, "--steps", str(args.steps), "--gc", gc])
            res["peak_rss_mb"] = peak
            results[setting] = res
            print(json.dumps(res), file=sys.stderr)
        table(results, gc)


def table(results: dict, gc: str) -> None:
    base = results.get("fp32")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"torch {__import__('torch').__version__}, {THREADS} threads, gradient checkpointing: {gc}\n")
    print("| base | load (s) | RSS after load (MiB) | peak RSS (MiB) | peak / fp32 | step (s, median) | step / fp32 |")
    print("|---|---|---|---|---|---|---|")
    for setting, r in results.items():
        step = statistics.median(r["step_s"][1:] or r["step_s"])
        ratio = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-"
        sratio = f"{step / statistics.median(base['step_s'][1:] or base['step_s']):.2f}" if base else "-"
        print(f"| {setting} | {r['load_s']:.1f} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} | "
              f"{step:.2f} | {sratio} |", flush=True)


if __name__ == "__main__":
    main()
