"""Training throughput and final eval loss: ``peftkit train`` vs Hugging Face PEFT + transformers.Trainer.

Same model (the bundled stories260k), same tokenized data (the bundled E2E NLG demo: 800 training
examples, 100 eval), same LoRA (r=8, alpha=8, q_proj/v_proj or --targets), same optimiser settings
(AdamW, lr, 3 warmup steps then linear decay, clipping at 1.0, batch 16, --steps steps), in one
process, run alternately --repeats times. Tokens per second count the non-padding input tokens of the
training batches over the training time only (no evaluation, no saving). The eval loss of both is
computed by the same function (token-weighted cross-entropy over the eval set's target tokens).

    python bench/bench_train.py [--steps 60] [--repeats 2] [--threads 1] [--targets all-linear]
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
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
            trainer = Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", output_dir=out, quiet=True)
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
