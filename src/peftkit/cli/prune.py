"""``peftkit prune``: a pruned model folder (weights, masks, report) from a model and calibration data.

    peftkit prune --method wanda --sparsity 0.5 --output-dir pruned/       # the bundled model and E2E data
    peftkit prune --model m/ --method magnitude --pattern 2:4 --output-dir pruned-24/
    peftkit train --model pruned/ --keep-sparsity ...                      # LoRA recovery, zeros kept
    peftkit merge runs/x/adapter --model pruned/ --keep-sparsity --output-dir recovered/

The folder is a transformers model folder (the zeros are in the weights) with the tokenizer,
``pruning_masks.safetensors`` (the keep-masks: what later steps respect), ``report.json`` and
``sparsity.png``. The report compares the dense and the pruned model: parameters, non-zeros, size on
disk, forward latency, and loss / perplexity (language models) or accuracy / F1 (classifiers) on the
evaluation data.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from typing import Any

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser, check_new_output_dir, converter, int_at_least, resolve_device, staging_folder


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} prune", formatter_class=Formatter,
               description="Prune a model's linear layers (magnitude or Wanda; unstructured or N:M) and write the "
                           "pruned model, its masks and a report comparing it with the dense model.")
    p.add_argument("--model", help="model folder or Hub id (default: the bundled stories260k)")
    p.add_argument("--method", choices=["magnitude", "wanda"], default="wanda",
                   help="magnitude: |W|; wanda: |W|·‖X‖ from calibration activations (Sun et al. 2023)")
    p.add_argument("--sparsity", type=float, help="fraction of weights set to zero, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4 (at most N non-zeros in every M inputs)")
    p.add_argument("--scope", choices=["layer", "row", "global"],
                   help="comparison group (default: layer for magnitude, row for wanda)")
    p.add_argument("--heads", type=float,
                   help="structured: the fraction of each layer's attention heads to remove physically (Llama, "
                        "GPT-2, BERT); importance by --method (magnitude: L1, wanda: L1 x input norms)")
    p.add_argument("--channels", type=float, help="structured: the fraction of each layer's MLP channels to remove")
    p.add_argument("--target-modules", type=converter(list[str], "--target-modules"),
                   help="modules to prune (default: every linear layer but the output head)")
    p.add_argument("--exclude", type=converter(list[str], "--exclude"), help="modules never pruned")
    p.add_argument("--data", help="calibration data file, as peftkit train reads (default: the bundled E2E demo)")
    p.add_argument("--eval-data", help="evaluation data (default: the data's eval split)")
    p.add_argument("--format", choices=["text", "instruction", "chat", "classification", "seq2seq"])
    p.add_argument("--columns", type=converter(dict[str, str], "--columns"), help="field=column pairs")
    p.add_argument("--calibration-samples", type=int_at_least(1, "--calibration-samples"), default=128)
    p.add_argument("--max-length", type=int_at_least(1, "--max-length"), default=128,
                   help="longest calibration / eval example in tokens")
    p.add_argument("--max-eval-samples", type=int_at_least(1, "--max-eval-samples"), default=64)
    p.add_argument("--no-latency", dest="latency", action="store_false",
                   help="skip timing the dense and pruned forward (timing keeps a copy of the dense model in memory)")
    p.add_argument("--device", help="cpu, cuda, ... (default: GPU if available)")
    p.add_argument("--output-dir", required=True, help="where to write the pruned model")
    return p


def _calibration(examples: list[Any], tokenizer: Any, task_type: str, n: int, batch_size: int = 8) -> list[dict]:
    """Batches of the first ``n`` training examples (inputs only) for Wanda's activation norms."""
    from ..train.collate import collate

    chosen = examples[:n]
    batches = []
    for i in range(0, len(chosen), batch_size):
        batch = collate(chosen[i:i + batch_size], tokenizer.pad_token_id, task_type)
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    return batches


def _check_settings(args: argparse.Namespace, structured: bool) -> None:
    """The numbers the library would refuse, refused before any model or data is read (ConfigError)."""
    from ..prune.masks import check_sparsity, parse_nm

    if structured:
        for flag in ("heads", "channels"):
            value = getattr(args, flag)
            if value is not None and not 0.0 <= value < 1.0:
                raise PeftkitError(f"--{flag} must be a fraction in [0, 1), got {value}.")
        return
    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    if args.pattern is not None:
        parse_nm(args.pattern)


def _write_report(folder: str, result: Any, common: dict[str, Any], structured: bool) -> None:
    """report.json (and for unstructured pruning sparsity.png) of a pruning run."""
    from ..train.compression import plot_layer_sparsity, write_report

    if structured:
        write_report(folder, {**common, "structured": {
            "architecture": result.architecture, "importance": result.importance, "heads": result.heads,
            "kv_heads": result.kv_heads, "channels": result.channels, "params": result.params,
            "param_reduction": result.param_reduction, "config_describes_model": result.config_describes_model}})
        return
    layers = [dataclasses.asdict(row) for row in result.report.layers]
    plot_layer_sparsity(layers, os.path.join(folder, "sparsity.png"),
                        f"{result.method} {result.pattern or f'{result.sparsity:.0%}'}")
    write_report(folder, {**common, "sparsity": result.sparsity, "pattern": result.pattern, "scope": result.scope,
                          "layers": layers, "pruned_layers": {"numel": result.report.numel,
                                                              "zeros": result.report.zeros,
                                                              "sparsity": result.report.sparsity}})


def cmd_prune(argv: list[str]) -> int:
    from ..prune import prune_model, save_masks, save_structured, structured_prune
    from ..train.compression import MASKS_FILE, compare_latency_ms, latency_batch, measure, print_comparison
    from ..train.config import DataConfig
    from ..train.data import prepare_data
    from ..train.modeling import default_model_path, load_model, load_tokenizer, task_for

    args = _parser().parse_args(argv)
    check_new_output_dir(args.output_dir)
    for flag in ("data", "eval_data"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise PeftkitError(f"--{flag.replace('_', '-')} {path} does not exist.")
    structured = args.heads is not None or args.channels is not None
    if structured and (args.sparsity is not None or args.pattern or args.scope or args.target_modules or args.exclude):
        raise PeftkitError("--heads / --channels prune whole heads and channels; --sparsity, --pattern, --scope, "
                           "--target-modules and --exclude belong to unstructured pruning: choose one kind.")
    _check_settings(args, structured)  # before anything loads
    device = resolve_device(args.device)
    model_path = args.model or default_model_path()
    tokenizer = load_tokenizer(model_path)
    config = DataConfig(data=args.data, eval_data=args.eval_data, format=args.format, columns=args.columns or {},
                        max_length=args.max_length, max_eval_samples=args.max_eval_samples)
    data = prepare_data(config, tokenizer, lambda fmt: task_for(fmt, model_path))
    labels = data.label_names
    model = load_model(model_path, data.task_type, num_labels=len(labels) if labels else None,
                       id2label=dict(enumerate(labels)) if labels else None, pad_token_id=tokenizer.pad_token_id)
    model.to(device).eval()
    dense = measure(model, tokenizer, data.eval, data.task_type, device,
                    folder=model_path if os.path.isdir(model_path) else None)
    dense_copy = copy.deepcopy(model) if args.latency else None  # timed beside the pruned model
    calibration = (_calibration(data.train.examples, tokenizer, data.task_type, args.calibration_samples)
                   if args.method == "wanda" else None)
    if structured:
        result = structured_prune(model, args.heads or 0.0, args.channels or 0.0, calibration=calibration,
                                  importance="wanda" if args.method == "wanda" else "l1")
        print(result.summary())
    else:
        kwargs: dict[str, Any] = {"sparsity": args.sparsity, "pattern": args.pattern, "scope": args.scope,
                                  "calibration": calibration, "target_modules": args.target_modules}
        if args.exclude is not None:
            kwargs["exclude"] = args.exclude
        result = prune_model(model, args.method, **kwargs)
        print(result.report)
    with staging_folder(args.output_dir) as staging:
        if structured:
            save_structured(model, staging)
        else:
            model.save_pretrained(staging)
            save_masks({k: v.cpu() for k, v in result.masks.items()}, os.path.join(staging, MASKS_FILE))
        tokenizer.save_pretrained(staging)
        pruned = measure(model, tokenizer, data.eval, data.task_type, device, folder=staging)
        if dense_copy is not None and data.eval is not None and len(data.eval):
            timed = compare_latency_ms({"dense": dense_copy, "pruned": model},
                                       latency_batch(data.eval, tokenizer, data.task_type))
            dense["latency_ms"], pruned["latency_ms"] = timed["dense"], timed["pruned"]
            del dense_copy
        common = {"model": model_path, "method": args.method, "dense": dense, "pruned": pruned,
                  "calibration_examples": len(data.train.examples[:args.calibration_samples]) if calibration else 0,
                  "eval_examples": len(data.eval) if data.eval is not None else 0}
        _write_report(staging, result, common, structured)
    print()
    print_comparison({"dense": dense, "pruned": pruned})
    if structured:
        how = ("plain from_pretrained loads it" if result.config_describes_model
               else "load it with peftkit.load_structured: its config cannot state the new head counts")
        print(f"wrote {args.output_dir}: the pruned model with structure.json ({how}), report.json")
    else:
        print(f"wrote {args.output_dir}: the pruned model, {MASKS_FILE}, report.json, sparsity.png")
    return 0


__all__ = ["cmd_prune"]
