"""``peftkit quantize``: a (merged) model folder quantized for CPU inference (int8 dynamic), written as a
model folder with a report: parameters, size on disk, forward latency and eval loss, float against int8."""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any, Optional

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser, check_new_output_dir, int_at_least, staging_folder

REPORT_NAME = "report.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def cmd_quantize(argv: list[str]) -> int:
    from ..quant.dynamic import check_quantizable, quantize_dynamic_int8
    from ..train.compression import compare_latency_ms

    args = _parser().parse_args(argv)
    if not args.int8:
        raise PeftkitError("Choose the format: --int8 (int8 weights, int8 dynamic activations; the only one so far).")
    check_new_output_dir(args.output_dir)
    model_path = _model_folder(args)
    if args.data is not None and not os.path.isfile(args.data):
        raise PeftkitError(f"--data {args.data} does not exist.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok, task = _load(model_path)
    check_quantizable(model, args.skip_modules)  # before the float measurements: a refusal costs nothing
    batch = _latency_batch(tok, args.batch_size, args.max_length)
    eval_data = _eval_data(args, model_path, tok, task)
    before = _measure(model, tok, task, batch, eval_data, args)
    float_model = copy.deepcopy(model)  # timed beside the int8 model, in alternation
    quant = quantize_dynamic_int8(model, skip_modules=args.skip_modules)
    after = _measure(model, tok, task, batch, eval_data, args)
    timed = compare_latency_ms({"float": float_model, "int8": model}, batch, rounds=args.repeats, repeats=1)
    before["latency_s"], after["latency_s"] = timed["float"] / 1000, timed["int8"] / 1000
    del float_model
    with staging_folder(args.output_dir) as staging:  # renamed to --output-dir only when written and verified
        _write_and_verify(model, tok, batch, staging)
        report = _report(model_path, args, model, quant, before, after, batch, eval_data, staging)
        from .._io import atomic_write_bytes

        atomic_write_bytes(os.path.join(staging, REPORT_NAME), (json.dumps(report, indent=2) + "\n").encode())
    _print_report(report, args.output_dir)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} quantize", formatter_class=Formatter,
               description="Quantize a model folder for CPU inference (a merged model: run `peftkit merge` first) "
                           "and write it as a model folder that peftkit.load_dynamic_int8 and transformers (with "
                           "torchao installed) load, with report.json: parameters, size on disk, forward latency "
                           "and eval loss, float against int8.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model folder (same as --model)")
    p.add_argument("--model", help="model folder (default: the bundled stories260k)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights (per output channel) and int8 dynamic activations (per token), via torchao")
    p.add_argument("--output-dir", required=True, help="where to write the quantized model (new or empty)")
    p.add_argument("--skip-modules", nargs="+", default=["lm_head"], metavar="NAME",
                   help="modules kept in float (default: lm_head)")
    p.add_argument("--data", help="eval data file for the loss before/after (default: the bundled E2E eval data "
                                  "for the bundled model, else none)")
    p.add_argument("--max-samples", type=int_at_least(1, "--max-samples"), default=200,
                   help="evaluate on at most this many examples")
    p.add_argument("--batch-size", type=int_at_least(1, "--batch-size"), default=8,
                   help="rows of the latency batch (bundled eval texts) and of the eval batches")
    p.add_argument("--max-length", type=int_at_least(1, "--max-length"), default=128,
                   help="longest row of the latency batch and of the eval examples, in tokens")
    p.add_argument("--repeats", type=int_at_least(1, "--repeats"), default=10,
                   help="timed forward passes (the median is reported)")
    p.add_argument("--threads", type=int_at_least(1, "--threads"), help="torch CPU threads (default: torch's)")
    return p


def _model_folder(args: argparse.Namespace) -> str:
    """The model folder to quantize: a local float Hugging Face folder (checked before anything loads)."""
    from ..train.modeling import default_model_path

    path = args.model or args.model_pos or default_model_path()
    if not os.path.isdir(path):
        raise PeftkitError(f"Model folder {path} does not exist (peftkit quantize reads a local model folder).")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise PeftkitError(f"{path} is an adapter folder; merge it into its base model first (peftkit merge "
                               f"{path} --output-dir MERGED), then quantize MERGED.")
        raise PeftkitError(f"{path} has no config.json: not a Hugging Face model folder.")
    try:
        with open(config_path, encoding="utf-8") as fh:
            quant = json.load(fh).get("quantization_config")
    except (OSError, ValueError, AttributeError) as exc:
        raise PeftkitError(f"{config_path} cannot be read as JSON ({exc}).") from None
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise PeftkitError(f"{path} is already quantized ({method}); quantize a float model folder.")
    return path


def _load(model_path: str) -> tuple[Any, Any, str]:
    """The float model (eval mode), its tokenizer (with a pad token) and its task."""
    from ..train.modeling import load_hf_config, load_model, load_tokenizer, task_for

    archs = getattr(load_hf_config(model_path), "architectures", None) or []
    classifier = any(str(a).endswith("ForSequenceClassification") for a in archs)
    task = task_for("classification" if classifier else "text", model_path)
    tok = load_tokenizer(model_path)
    model = load_model(model_path, task, dtype="float32", pad_token_id=tok.pad_token_id)
    return model.eval(), tok, task


def _latency_batch(tok: Any, batch_size: int, max_length: int) -> dict[str, Any]:
    """``batch_size`` bundled E2E eval texts (source and target), tokenized and padded to the longest."""
    from ..train.data import bundled_data, read_records

    records = read_records(bundled_data()[1])
    texts = [f"{r['source']}\n{r['target']}" for r in (records * batch_size)[:batch_size]]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _eval_data(args: argparse.Namespace, model_path: str, tok: Any, task: str) -> Optional[tuple[str, Any]]:
    """(path, dataset) of the eval data: --data, or the bundled E2E eval data for the bundled model, or None."""
    from ..train.config import DataConfig
    from ..train.data import bundled_data, prepare_data
    from ..train.modeling import default_model_path

    path = args.data
    if path is None and os.path.realpath(model_path) == os.path.realpath(default_model_path()):
        path = bundled_data()[1]
    if path is None:
        return None
    cfg = DataConfig(eval_data=path, max_length=args.max_length, max_eval_samples=args.max_samples)
    data = prepare_data(cfg, tok, lambda fmt: task, need_train=False)
    return path, data.eval


def _measure(model: Any, tok: Any, task: str, batch: dict[str, Any], eval_data: Optional[tuple[str, Any]],
             args: argparse.Namespace) -> dict[str, Optional[float]]:
    """The eval loss (None without eval data); the latency is measured apart, float and int8 in alternation."""
    import torch

    from ..train.loop import evaluate

    out: dict[str, Optional[float]] = {"latency_s": None, "eval_loss": None}
    if eval_data is not None:
        metrics = evaluate(model, eval_data[1], tok, task_type=task, device=torch.device("cpu"),
                           batch_size=args.batch_size, generate_samples=0)
        out["eval_loss"] = float(metrics["eval_loss"])
    return out


def _write_and_verify(model: Any, tok: Any, batch: dict[str, Any], folder: str) -> None:
    """Save the int8 model to ``folder``, reload it, and check that it computes what the model does."""
    import torch

    from ..quant.dynamic import load_dynamic_int8, save_dynamic_int8

    save_dynamic_int8(model, folder, tokenizer=tok)
    reloaded = load_dynamic_int8(folder)
    with torch.inference_mode():
        diff = float((reloaded(**batch).logits.float() - model(**batch).logits.float()).abs().max())
    if diff > 1e-5:
        raise PeftkitError(f"The reloaded int8 model differs from the quantized model by {diff:.3e}, so nothing "
                           "was written.")


def weights_bytes(folder: str) -> int:
    """Bytes of the weight files (safetensors, .bin, .pt) at the top of a model folder."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
               if n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, n)))


def _report(model_path: str, args: argparse.Namespace, model: Any, quant: Any, before: dict, after: dict,
            batch: dict[str, Any], eval_data: Optional[tuple[str, Any]], folder: str) -> dict[str, Any]:
    import torch

    from ..quant.dynamic import torchao_version
    from ..train.reporting import folder_bytes

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or not b else a / b

    float_weights, int8_weights = weights_bytes(model_path), weights_bytes(folder)
    return {
        "model": os.path.abspath(model_path), "format": "int8-dynamic", "library": f"torchao {torchao_version()}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_modules": len(quant.quantized), "skipped_modules": quant.skipped,
        "quantized_weight_bytes": {"float": quant.float_bytes, "int8": quant.int8_bytes},
        "weights_bytes": {"float": float_weights, "int8": int8_weights, "ratio": ratio(int8_weights, float_weights)},
        "folder_bytes": {"float": folder_bytes(model_path), "int8": folder_bytes(folder)},
        "latency_s": {"float": before["latency_s"], "int8": after["latency_s"],
                      "speedup": ratio(before["latency_s"], after["latency_s"])},
        "latency_batch": list(batch["input_ids"].shape), "latency_repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "eval_data": eval_data[0] if eval_data else None,
        "eval_examples": len(eval_data[1]) if eval_data else None,
        "eval_loss": {"float": before["eval_loss"], "int8": after["eval_loss"]},
    }


def _print_report(report: dict[str, Any], output_dir: str) -> None:
    from .._io import human_bytes

    w, lat, loss = report["weights_bytes"], report["latency_s"], report["eval_loss"]
    print(f"wrote {output_dir}: int8 dynamic model ({report['quantized_modules']} linears int8; "
          f"{report['parameters']:,} parameters) and {REPORT_NAME}")
    print(f"   size on disk  float {human_bytes(w['float'])} -> int8 {human_bytes(w['int8'])} "
          f"({w['ratio']:.2f}x)" if w["ratio"] else f"   size on disk  int8 {human_bytes(w['int8'])}")
    print(f"   latency       float {lat['float'] * 1e3:.1f} ms -> int8 {lat['int8'] * 1e3:.1f} ms "
          f"({lat['speedup']:.2f}x speed-up; batch {'x'.join(map(str, report['latency_batch']))}, "
          f"{report['threads']} threads, median of {report['latency_repeats']})")
    if loss["float"] is not None:
        print(f"   eval loss     float {loss['float']:.4f} -> int8 {loss['int8']:.4f} "
              f"({report['eval_examples']} examples of {report['eval_data']})")
