"""``peftkit eval``: the task metrics of a model with an adapter on a data file."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..errors import PeftkitError
from .args import (PROG, Formatter, Parser, add_quantize_flag, check_output_file, converter, int_at_least, quantize_arg,
                   resolve_device)


def cmd_eval(argv: list[str]) -> int:
    from ..train.config import DataConfig
    from ..train.data import prepare_data
    from ..train.loop import evaluate
    from ..train.runner import load_for_inference

    p = Parser(prog=f"{PROG} eval", formatter_class=Formatter,
                                description="Compute the task metrics (loss/perplexity, accuracy/F1, exact match/"
                                            "ROUGE-L) of a model with an adapter on a data file.")
    p.add_argument("adapter_pos", nargs="?", metavar="ADAPTER", help="adapter folder (same as --adapter)")
    p.add_argument("--adapter", help="adapter folder (leave out to evaluate the base model)")
    p.add_argument("--model", help="base model folder or Hub id (default: the adapter's base model)")
    p.add_argument("--data", help="data file (default: the eval data of the run that wrote the adapter)")
    p.add_argument("--format", choices=["text", "instruction", "chat", "classification", "seq2seq"],
                   help="data format (default: the run's, else detected)")
    p.add_argument("--columns", type=converter(dict[str, str], "--columns"), help="field=column pairs")
    p.add_argument("--max-length", type=int_at_least(1, "--max-length"), help="longest example in tokens")
    p.add_argument("--max-samples", type=int_at_least(1, "--max-samples"), help="evaluate at most this many examples")
    p.add_argument("--batch-size", type=int_at_least(1, "--batch-size"), default=16)
    p.add_argument("--generate-samples", type=int_at_least(0, "--generate-samples"), default=32,
                   help="examples scored by generation for exact match and ROUGE-L (generation tasks; 0: none)")
    p.add_argument("--max-new-tokens", type=int_at_least(1, "--max-new-tokens"), default=48)
    p.add_argument("--device", help="cpu, cuda, ... (default: GPU if available)")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    add_quantize_flag(p)
    args = p.parse_args(argv)
    adapter = args.adapter or args.adapter_pos
    device = resolve_device(args.device)
    if args.output:
        check_output_file(args.output)
    if args.data is not None and not os.path.isfile(args.data) and not os.path.isdir(args.data):
        raise PeftkitError(f"--data {args.data} does not exist.")
    loaded = load_for_inference([("default", adapter)] if adapter else [], args.model, device=device,
                                quantize=quantize_arg(args.quantize))
    cfg: DataConfig = loaded.data_config
    changes: dict[str, Any] = {}
    if args.format:
        changes["format"] = args.format
    if args.columns:
        changes["columns"] = args.columns
    if args.max_length is not None:
        changes["max_length"] = args.max_length
    changes["max_eval_samples"] = args.max_samples
    cfg = dataclasses.replace(cfg, data=None, **changes)
    data_path = args.data
    if data_path is None:
        data_path = cfg.eval_data  # the eval data of the run that wrote the adapter (read by load_for_inference)
        if not data_path:
            raise PeftkitError("Pass --data FILE to evaluate on.")
    data = prepare_data(dataclasses.replace(cfg, eval_data=data_path), loaded.tokenizer, lambda fmt: loaded.task_type,
                        need_train=False, label_names=loaded.label_names)
    metrics = evaluate(loaded.model, data.eval, loaded.tokenizer, task_type=loaded.task_type, device=device,
                       batch_size=args.batch_size, generate_samples=args.generate_samples,
                       max_new_tokens=args.max_new_tokens)
    print(f"== {adapter or loaded.model_path} on {data_path} ({len(data.eval)} examples, format {data.format})")
    for k, v in metrics.items():
        print(f"   {k:<20} {v:.4f}")
    if args.output:
        from .._io import atomic_write_bytes

        atomic_write_bytes(args.output, json.dumps({"data": data_path, "adapter": adapter, **metrics}, indent=2).encode())
    return 0
