"""The real-sized row of bench_train.py (``--model llama100m``): see bench_train.py's docstring.

Each run is a child process (multiprocessing, spawn) so that its peak RSS (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# peftkit's ladder: (name, packing, TrainConfig settings), each rung adding one technique to the one before;
# the speed options are set on every rung so that a change of their defaults leaves the rungs as they are
PLAIN = {"loss_head": "full", "fused_lora": False, "compile": "off", "gradient_checkpointing": False,
         "packed_attention": "mask", "last_block_at_targets": False}
FUSED = {**PLAIN, "loss_head": "chunked", "fused_lora": True}
LADDER = [("padded+full", False, PLAIN), ("packed+full", True, PLAIN),
          ("packed+chunked", True, {**PLAIN, "loss_head": "chunked"}),
          ("+fused LoRA", True, FUSED),
          ("+segments", True, {**FUSED, "packed_attention": "segments"}),
          ("+last block at targets", True, {**FUSED, "packed_attention": "segments", "last_block_at_targets": True}),
          ("+compile (masked rows)", True, {**FUSED, "compile": "on"}),
          ("+checkpointing", True, {**FUSED, "packed_attention": "segments", "gradient_checkpointing": True})]
DEFAULTS = ("peftkit defaults", None, {})  # whatever peftkit chooses on this model and machine


def build_model() -> Any:
    """The seeded random-weight 110M Llama (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def load_data(n_train: int, n_eval: int) -> tuple[Any, Any]:
    """The bundled E2E data as instruction data (the prompt masked), the first n_train / n_eval examples."""
    import peftkit
    from peftkit.train.config import DataConfig
    from peftkit.train.data import prepare_data
    from peftkit.train.modeling import load_tokenizer

    tok = load_tokenizer(str(peftkit.model_path()))
    data = prepare_data(DataConfig(), tok, lambda f: "CAUSAL_LM")
    data.train.examples = data.train.examples[:n_train]
    data.eval.examples = data.eval.examples[:n_eval]
    return tok, data


def target_tokens(examples: list[Any]) -> int:
    return sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)


def run_peftkit(args: Any, packing: Any, settings: dict[str, Any]) -> dict[str, Any]:
    import peftkit
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import Trainer

    tok, data = load_data(args.examples, args.eval_examples)
    model = build_model()
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16,
                                                          target_modules=LORA_TARGETS))
    mean_len = statistics.mean(len(e.input_ids) for e in data.train.examples)
    row_length = args.row_length or equal_steps_row(data.train.examples, len(data.train.examples) // args.batch)
    rows = 1 if not args.row_length else max(1, round(args.batch * mean_len / row_length))
    cfg = TrainConfig(epochs=1, batch_size=1, lr=args.lr, warmup_steps=0, scheduler="linear",
                      max_grad_norm=1.0, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                      progress=False, seed=0, **settings)
    kw = dict(task_type="CAUSAL_LM", quiet=True, packing=packing, max_length=row_length)
    probe = Trainer(pm, tok, data.train, data.eval, cfg, **kw)  # packed or not (packed: rows a step)
    import dataclasses

    cfg = dataclasses.replace(cfg, batch_size=rows if probe.packed else args.batch)
    trainer = Trainer(pm, tok, data.train, data.eval, cfg, **kw)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for s in range(trainer.total_steps)
                  for b in trainer.micro_batches(s))
    result = trainer.fit()
    return {"seconds": result.report["train_seconds"], "targets": targets,
            "eval_loss": result.metrics_after["eval_loss"], "steps": trainer.total_steps,
            "how": f"{trainer.batching}; {trainer.loss_head.describe()}; checkpointing "
                   f"{trainer.checkpointing.describe()}; {trainer.compile_plan.describe()}; "
                   f"fused LoRA {trainer.fused_lora}; attention {trainer.segments.describe()}"}


def equal_steps_row(examples: list[Any], steps: int) -> int:
    """The shortest packed-row length (a multiple of 32) that packs ``examples`` into at most ``steps`` rows:
    one row a step then makes as many optimizer steps as the peer's batches of --batch examples."""
    from peftkit.train.collate import pack

    length = max(len(e.input_ids) for e in examples)
    while len(pack(examples, length)) > max(steps, 1):
        length += 32
    return length


class Records(torch.utils.data.Dataset):
    def __init__(self, examples: list[Any]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.examples[i]
        return {"input_ids": list(e.input_ids), "labels": list(e.labels)}


def run_hf(args: Any) -> dict[str, Any]:
    import peft
    import transformers

    from peftkit.train.collate import collate
    from peftkit.train.data import Example
    from peftkit.train.evaluation import evaluate

    tok, data = load_data(args.examples, args.eval_examples)
    model = build_model()
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16,
                                                    target_modules=LORA_TARGETS))
    seen = {"targets": 0}
    flatten = transformers.DataCollatorWithFlattening()

    def collator(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if args.peer == "flatten":
            batch = flatten(features)
        else:
            batch = collate([Example(input_ids=f["input_ids"], labels=f["labels"]) for f in features],
                            tok.pad_token_id, "CAUSAL_LM")
        seen["targets"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=1, per_device_train_batch_size=args.batch, learning_rate=args.lr,
            warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",
            save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            dataloader_drop_last=True, remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if args.peer == "group_by_length" else "random")
        trainer = transformers.Trainer(model=pm, args=targs, train_dataset=Records(data.train.examples),
                                       data_collator=collator)
        metrics = trainer.train().metrics
    ev = evaluate(pm, data.eval, tok, task_type="CAUSAL_LM", device=torch.device("cpu"), batch_size=16)
    return {"seconds": metrics["train_runtime"], "targets": seen["targets"], "eval_loss": ev["eval_loss"],
            "steps": trainer.state.global_step, "how": f"HF PEFT + Trainer, peer {args.peer}"}


def child(args: Any, side: tuple[str, Any, dict[str, Any]], queue: Any) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    name, packing, settings = side
    out = run_hf(args) if name == "hf" else run_peftkit(args, packing, settings)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    queue.put(out)


def run_child(args: Any, side: tuple[str, Any, dict[str, Any]]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(args, side, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def profile_step(args: Any) -> None:
    """A torch.profiler table of one peftkit training step (defaults) on the 100M row."""
    from torch.profiler import ProfilerActivity, profile

    import peftkit
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import Trainer

    tok, data = load_data(args.examples, args.eval_examples)
    pm = peftkit.get_peft_model(build_model(), peftkit.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16,
                                                                  target_modules=LORA_TARGETS))
    cfg = TrainConfig(max_steps=2, batch_size=3, progress=False, eval_steps=0, save_steps=0, num_generations=0,
                      eval_generate_samples=0, loss_head=os.environ.get("LOSS_HEAD", "auto"))
    trainer = Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", quiet=True,
                      max_length=args.row_length or 1280)
    pm.train()
    trainer.train_step(trainer.micro_batches(0))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(trainer.micro_batches(1))
    print(trainer.batching, "|", trainer.loss_head.describe())
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


STEP_SIDES = [("chunked, eager", {**PLAIN, "loss_head": "chunked"}),
              ("+fused LoRA", FUSED),
              ("+fused +segments", {**FUSED, "packed_attention": "segments"}),
              ("+fused +compile", {**FUSED, "compile": "on"})]


def step_times(args: Any) -> None:
    """Steady-state step times of the speed options, in one process: a trainer per side (same seeded
    model and data), the sides alternating step by step on the same batches; the first 2 steps (compile:
    the first width, then the dynamic-shape recompile) are reported apart as the compile cost."""
    import peftkit
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import Trainer

    tok, data = load_data(args.examples, args.eval_examples)
    steps = args.timed_steps + 2
    trainers = {}
    for name, settings in STEP_SIDES:
        torch.manual_seed(0)
        pm = peftkit.get_peft_model(build_model(), peftkit.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16,
                                                                      target_modules=LORA_TARGETS))
        cfg = TrainConfig(max_steps=steps, batch_size=args.step_rows, progress=False, eval_steps=0, save_steps=0,
                          num_generations=0, eval_generate_samples=0, seed=0, lr=args.lr, **settings)
        trainers[name] = Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", quiet=True,
                                 packing=True, max_length=args.row_length or 1280)
        pm.train()
    wall = {n: [] for n in trainers}
    cpu = {n: [] for n in trainers}
    losses = {n: [] for n in trainers}
    for step in range(steps):
        for name, trainer in trainers.items():
            batches = trainer.micro_batches(step)
            torch.manual_seed(step)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name].append(trainer.train_step(batches))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"step {step}: " + "  ".join(f"{n} {wall[n][-1]:.2f} s" for n in trainers), flush=True)
    base = STEP_SIDES[0][0]
    tokens = [sum(int(b["input_ids"].numel()) for b in trainers[base].micro_batches(s)) for s in range(steps)]
    print(f"\n== step times, llama100m, {args.step_rows} packed rows of <= {args.row_length or 1280} tokens a step "
          f"({statistics.mean(tokens[2:]):.0f} tokens on average), {args.timed_steps} timed steps after 2, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"   {'side':<18} {'wall median':>11} {'wall min':>9} {'cpu median':>10} {'x eager (wall med, min)':>24}"
          f" {'first 2 steps':>13} {'max |loss - eager|':>18}")
    for name in trainers:
        w, c = wall[name][2:], cpu[name][2:]
        ratio_med = statistics.median(wall[base][2:]) / statistics.median(w)
        ratio_min = min(wall[base][2:]) / min(w)
        diff = max(abs(a - b) for a, b in zip(losses[name], losses[base]))
        print(f"   {name:<18} {statistics.median(w):10.2f}s {min(w):8.2f}s {statistics.median(c):9.2f}s "
              f"{ratio_med:14.2f}, {ratio_min:.2f} {sum(wall[name][:2]):12.1f}s {diff:18.2e}")


def main_100m(args: Any) -> None:
    if args.profile:
        profile_step(args)
        return
    if args.step_times:
        step_times(args)
        return
    rungs = LADDER if args.ladder else []
    if args.rungs:
        rungs = [LADDER[int(i)] for i in args.rungs.split(",")]
    sides = [("hf", None, {})] + rungs + [DEFAULTS]
    rows: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in sides}
    for r in range(args.repeats):
        for side in sides:
            t0 = time.perf_counter()
            out = run_child(args, side)
            out["tps"] = out["targets"] / out["seconds"]
            rows[side[0]].append(out)
            print(f"run {r + 1} {side[0]:<24} {out['tps']:8,.1f} target tokens/s  train {out['seconds']:6.1f} s "
                  f"({out['steps']} steps, {out['targets']} targets)  peak RSS {out['peak_rss'] / 2**20:6.0f} MiB  "
                  f"eval_loss {out['eval_loss']:.4f}  (wall {time.perf_counter() - t0:.0f} s)  [{out['how']}]",
                  flush=True)
    report(args, rows)


def report(args: Any, rows: dict[str, list[dict[str, Any]]]) -> None:
    import transformers

    threads = args.threads or torch.get_num_threads()
    print(f"\n== llama100m (110M, random weights), E2E instruction data: {args.examples} examples, batch "
          f"{args.batch}, LoRA r=16 all linear, lr {args.lr}, torch threads {threads}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    hf = rows["hf"]
    peer_loss = statistics.mean(x["eval_loss"] for x in hf)
    for name, runs in rows.items():
        tps = [x["tps"] for x in runs]
        ratios = [a["tps"] / b["tps"] for a, b in zip(runs, hf)]
        loss = statistics.mean(x["eval_loss"] for x in runs)
        shown = ", ".join(f"{t:,.1f}" for t in tps)
        print(f"   {name:<24} tokens/s median {statistics.median(tps):8,.1f} (runs {shown})"
              f"  x peer per pair {', '.join(f'{q:.2f}' for q in ratios)}  peak RSS "
              f"{max(x['peak_rss'] for x in runs) / 2**20:,.0f} MiB  eval loss {loss:.4f}"
              + ("" if name == "hf" else f" ({100 * (loss / peer_loss - 1):+.2f}% vs peer)"))
    assert all(math.isfinite(x["eval_loss"]) for v in rows.values() for x in v)
