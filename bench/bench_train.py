"""Training throughput and final eval loss: ``peftkit train`` vs Hugging Face PEFT + transformers.Trainer.

Same model (the bundled stories260k), same tokenized data (the bundled E2E NLG demo: 800 training
examples, 100 eval), same LoRA (r=8, alpha=8, q_proj/v_proj or --targets), same optimiser settings
(AdamW, lr, 3 warmup steps then linear decay, clipping at 1.0, batch 16, --steps steps), in one
process, run alternately --repeats times. Tokens per second count the non-padding input tokens of the
training batches over the training time only (no evaluation, no saving). The eval loss of both is
computed by the same function (token-weighted cross-entropy over the eval set's target tokens).

    python bench/bench_train.py [--steps 60] [--repeats 2] [--threads 1] [--targets all-linear]

``--model llama100m``: the real-sized row. A random-weight Llama of 110M parameters (hidden 768, 12 layers,
12 heads, intermediate 2048, vocab 32,000, tied embeddings; seeded) on the bundled E2E NLG data in its
instruction form (the meaning representation is the prompt, masked from the loss; 160 tokens on average
with the bundled tokenizer, 46% of them targets), LoRA r=16 alpha=16 on every linear layer of the blocks,
AdamW lr --lr (default 1e-3 here), no warmup (the two count warmup steps differently), linear decay,
clipping 1.0. Token budget: one pass over the first --examples training examples, for every side;
--batch examples a step (packed runs: by default one row a step, of the shortest length that packs the
examples into as many rows as the peer makes steps, so that both make the same number of optimizer steps;
--row-length N: rows of N tokens, as many a step as hold the same number of tokens on average). Each run is a child process of its
own (its peak RSS is its own), the sides alternating --repeats times. Tokens/s count the target tokens
(labels that are not -100) over the training time; the eval loss (same function for all) is over
--eval-examples held-out examples. Sides: the peer, Hugging Face PEFT + transformers.Trainer with the
padding-free ``DataCollatorWithFlattening`` (--peer flatten) or padded batches with
``train_sampling_strategy="group_by_length"`` (--peer group_by_length); and peftkit, by default at
its defaults, with --ladder also at the ladder's steps, each adding one technique: padded and full
logits, packed, the chunked loss-position head, the fused LoRA road, attention per packed example
(segments), torch.compile of the blocks (over masked rows: compiling and segments exclude each other),
activation checkpointing (a memory rung: compare the peak RSS) (--rungs 3,5: only those steps).

    python bench/bench_train.py --model llama100m --examples 48 --repeats 2 --threads 2 [--ladder | --rungs 3,5]

``--step-times``: the steady-state step time of the speed options (chunked eager, + fused LoRA, + segments,
+ compile)
in one process, the sides alternating step by step on the same packed batches; the first two steps (the
compilations) are reported apart, and per-step pairs give the spread (a few minutes on 2 CPUs):

    python bench/bench_train.py --model llama100m --step-times --timed-steps 12 --threads 2 --examples 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bundled", "llama100m"), default="bundled")
    parser.add_argument("--examples", type=int, default=48, help="llama100m: training examples (one pass)")
    parser.add_argument("--eval-examples", type=int, default=16, help="llama100m: eval examples")
    parser.add_argument("--batch", type=int, default=8, help="llama100m: examples a step")
    parser.add_argument("--row-length", type=int, default=0,
                        help="llama100m: tokens of a packed row (0: equal steps, see above; --step-times, --profile: 1280)")
    parser.add_argument("--ladder", action="store_true", help="llama100m: also peftkit's ladder steps")
    parser.add_argument("--rungs", default=None, help="llama100m: only these ladder steps (indices, e.g. 2,3,4)")
    parser.add_argument("--step-times", action="store_true",
                        help="llama100m: steady-state step times of the speed options in one process, then stop")
    parser.add_argument("--timed-steps", type=int, default=6, help="--step-times: steps timed after 2 warm-up steps")
    parser.add_argument("--step-rows", type=int, default=3, help="--step-times: packed rows a step")
    parser.add_argument("--peer", choices=("flatten", "group_by_length"), default="flatten")
    parser.add_argument("--profile", action="store_true", help="llama100m: profile one peftkit step, then stop")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--lr", type=float, default=None, help="default: 5e-3 (bundled), 1e-3 (llama100m)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = 1e-3 if args.model == "llama100m" else 5e-3
    if args.model == "llama100m":
        from bench_train_100m import main_100m

        main_100m(args)
        return
    import peft
    import transformers

    import peftkit
    from peftkit.train.collate import collate
    from peftkit.train.config import DataConfig, TrainConfig
    from peftkit.train.data import prepare_data
    from peftkit.train.loop import Trainer, evaluate
    from peftkit.train.modeling import load_tokenizer

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    tok = load_tokenizer(str(peftkit.model_path()))
    data = prepare_data(DataConfig(), tok, lambda f: "CAUSAL_LM")
    device = torch.device("cpu")

    def run_peftkit() -> tuple[float, float, float]:
        model, _ = peftkit.load_model()
        torch.manual_seed(0)
        pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=8,
                                                              target_modules=targets))
        cfg = TrainConfig(max_steps=args.steps, batch_size=16, lr=args.lr, warmup_steps=3, scheduler="linear",
                          max_grad_norm=1.0, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                          progress=False, seed=0)
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", output_dir=out, quiet=True,
                              packing=False)  # the batches of the peer (the llama100m row measures packing)
            result = trainer.fit()
        return result.report["tokens_per_second"], result.metrics_after["eval_loss"], result.report["train_seconds"]

    class Examples(torch.utils.data.Dataset):
        def __init__(self, examples):
            self.examples = examples

        def __len__(self):
            return len(self.examples)

        def __getitem__(self, i):
            return self.examples[i]

    def run_hf() -> tuple[float, float, float]:
        model, _ = peftkit.load_model()
        torch.manual_seed(0)
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=8,
                                                        target_modules=targets))
        seen = {"tokens": 0}

        def collator(examples):
            batch = collate(examples, tok.pad_token_id, "CAUSAL_LM")
            seen["tokens"] += int(batch["attention_mask"].sum())
            return batch

        with tempfile.TemporaryDirectory() as out:
            targs = transformers.TrainingArguments(
                output_dir=out, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=args.lr,
                warmup_steps=3, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
                optim="adamw_torch", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                seed=0, disable_tqdm=True, dataloader_drop_last=True)
            trainer = transformers.Trainer(model=pm, args=targs, train_dataset=Examples(data.train.examples),
                                           data_collator=collator)
            metrics = trainer.train().metrics
        seconds = metrics["train_runtime"]
        ev = evaluate(pm, data.eval, tok, task_type="CAUSAL_LM", device=device, batch_size=16)
        return seen["tokens"] / seconds, ev["eval_loss"], seconds

    rows: dict[str, list[tuple[float, float, float]]] = {"peftkit": [], "hf": []}
    for r in range(args.repeats):
        for name, fn in (("peftkit", run_peftkit), ("hf", run_hf)):
            t0 = time.perf_counter()
            rows[name].append(fn())
            tps, loss, sec = rows[name][-1]
            print(f"run {r + 1} {name:<8} {tps:9,.0f} tokens/s  train {sec:6.1f} s  eval_loss {loss:.4f}  "
                  f"(wall incl. setup {time.perf_counter() - t0:.1f} s)", flush=True)
    pk, hf = rows["peftkit"], rows["hf"]
    med = {n: statistics.median(x[0] for x in v) for n, v in rows.items()}
    print(f"\n== {args.steps} steps x batch 16, LoRA r=8 on {args.targets}, lr {args.lr}, torch threads "
          f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"   peftkit train: median {med['peftkit']:,.0f} tokens/s, eval loss {statistics.mean(x[1] for x in pk):.4f}")
    print(f"   HF PEFT + Trainer: median {med['hf']:,.0f} tokens/s, eval loss {statistics.mean(x[1] for x in hf):.4f}")
    print(f"   ratio peftkit / HF: {med['peftkit'] / med['hf']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
