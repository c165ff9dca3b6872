"""``peftkit merge``: an adapter merged into its base model, written as a standalone model folder and verified."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser, add_quantize_flag, check_new_output_dir, quantize_arg, staging_folder


def cmd_merge(argv: list[str]) -> int:
    import torch

    from ..quant import is_quantized_module
    from ..train.runner import load_for_inference

    args = _merge_parser().parse_args(argv)
    adapter = args.adapter or args.adapter_pos
    if not adapter:
        raise PeftkitError("Give the adapter folder to merge.")
    if not os.path.isdir(adapter):
        raise PeftkitError(f"Adapter folder {adapter} does not exist.")
    check_new_output_dir(args.output_dir)
    loaded = load_for_inference([("default", adapter)], args.model, dtype=args.dtype,
                                quantize=quantize_arg(args.quantize), keep_sparsity=args.keep_sparsity)
    masks = _pruning_masks(loaded.model_path, adapter, args.keep_sparsity)
    model, tok = loaded.model, loaded.tokenizer
    if not hasattr(model, "merge_and_unload"):
        raise PeftkitError(f"{type(model).__name__} adapters cannot be merged.")
    quantized = any(is_quantized_module(m) for m in model.modules())
    if args.export == "quantized" and not quantized:
        raise PeftkitError("--export quantized needs a quantized base, and this one is float (the run that wrote the "
                           "adapter did not quantize it); pass --quantize 4 or --quantize 8.")
    probe = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        ref = _probe_logits(model, probe, loaded.task_type)
    merged = _merge_and_unload(model, args, quantized)
    with staging_folder(args.output_dir) as staging:  # renamed to --output-dir only when written and verified
        what = _write_merged(merged, tok, staging, args, quantized)
        if masks is not None:
            what += _check_zeros(merged, masks, staging, args.keep_sparsity, loaded.model_path)
        if args.verify:
            _verify_merged(merged, loaded.task_type, probe, ref, staging, args)
    from ..train.reporting import folder_bytes, human_bytes

    print(f"wrote {args.output_dir} ({human_bytes(folder_bytes(args.output_dir))}): {what}")
    return 0


def _pruning_masks(model_path: str, adapter: str, keep: bool) -> Any:
    """The masks of a pruned base (``peftkit prune``), or None for a dense one. Without ``--keep-sparsity``
    the merge is dense: a note says so, and warns when the adapter was trained with the masks."""
    from ..train.compression import MASKS_FILE, read_model_masks
    from ..train.runner import read_run_file

    if keep:
        return read_model_masks(model_path)
    if not os.path.isfile(os.path.join(model_path, MASKS_FILE)):
        return None
    trained = bool(((read_run_file(adapter) or {}).get("model") or {}).get("keep_sparsity"))
    print("note: the base is pruned; a plain merge fills its zeros (dense result)"
          + (". This adapter was trained with --keep-sparsity: merge with --keep-sparsity to get the model it "
             "was trained as." if trained else "; --keep-sparsity keeps them (exact for adapters trained so)."))
    return read_model_masks(model_path)


def _check_zeros(merged: Any, masks: dict, folder: str, keep: bool, model_path: str) -> str:
    """How many pruned zeros the merge kept; with ``keep`` every one must be (MergeError otherwise), and the
    masks go into the merged folder so that it stays a pruned model for the next round."""
    import shutil

    import torch

    from ..errors import MergeError
    from ..train.compression import MASKS_FILE

    modules = dict(merged.named_modules())
    pruned = filled = 0
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None:
            continue
        off = ~mask.to(module.weight.device)
        pruned += int(off.sum())
        filled += int(torch.count_nonzero(module.weight.detach()[off]))
    if keep:
        if filled:
            raise MergeError(f"{filled} of {pruned} pruned weights are non-zero after a --keep-sparsity merge.")
        shutil.copyfile(os.path.join(model_path, MASKS_FILE), os.path.join(folder, MASKS_FILE))
        return f"; kept all {pruned} pruned zeros"
    return f"; the merge filled {filled} of the base's {pruned} pruned zeros"


def _merge_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} merge", formatter_class=Formatter,
                                description="Merge an adapter into its base model and write a standalone model folder: "
                                            "a Hugging Face model (loadable with transformers alone), or for a "
                                            "quantized base (QLoRA) either that (dequantized, exact) or a quantized "
                                            "folder for peftkit.load_quantized (requantized; the error is reported).")
    p.add_argument("adapter_pos", nargs="?", metavar="ADAPTER", help="adapter folder (same as --adapter)")
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--model", help="base model (default: the adapter's base model)")
    p.add_argument("--output-dir", required=True, help="where to write the merged model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--export", choices=["float", "quantized"], default="float",
                   help="float: a plain float model (a quantized base is dequantized first, so the merge is exact); "
                        "quantized: merge into the quantized weights (requantizing) and write them with "
                        "peftkit.save_quantized")
    add_quantize_flag(p)
    p.add_argument("--keep-sparsity", action="store_true",
                   help="a pruned base (peftkit prune): merge LoRA's ΔW masked by its masks, so every pruned zero stays "
                        "(exact for an adapter trained with --keep-sparsity); without it the merge is dense")
    p.add_argument("--safe-merge", action="store_true", help="check the merged weights for NaN before writing")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing the merged model's output with the adapter model's")
    return p


def _merge_and_unload(model: Any, args: argparse.Namespace, quantized: bool) -> Any:
    """``model.merge_and_unload`` as ``--safe-merge`` and ``--export`` ask; a requantizing warning becomes a note."""
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = model.merge_and_unload(safe_merge=args.safe_merge, dequantize=quantized and args.export == "float")
    except (AttributeError, NotImplementedError) as exc:
        raise PeftkitError(f"This adapter's method cannot be merged: {exc}") from None
    for w in caught:
        if "requantizing" in str(w.message):
            text = str(w.message).replace("Use merge_and_unload(dequantize=True)", "Use --export float")
            print(f"note: {text}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return merged


def _write_merged(merged: Any, tok: Any, folder: str, args: argparse.Namespace, quantized: bool) -> str:
    """Write the merged model (float or, with ``--export quantized``, quantized) and the tokenizer to
    ``folder``; what was written, in words."""
    if args.export == "quantized":
        from ..quant import save_quantized

        save_quantized(merged, folder)
        what = "a quantized model for peftkit.load_quantized, with the adapter merged in"
    elif getattr(merged, "peftkit_structure", None):  # heads / channels removed (peftkit prune): keep the record
        from ..prune import save_structured

        save_structured(merged, folder)
        what = f"a {type(merged).__name__} (structurally pruned: structure.json) with the adapter merged in"
    else:
        merged.save_pretrained(folder)
        what = f"a {type(merged).__name__} with the adapter merged in" + (" (base dequantized)" if quantized else "")
    tok.save_pretrained(folder)
    return what


def _verify_merged(merged: Any, task_type: str, probe: Any, ref: Any, folder: str, args: argparse.Namespace) -> None:
    """Reload ``folder`` and compare its logits on ``probe`` with the adapter model's (``ref``)."""
    import torch

    from ..auto import auto_class_for

    auto = auto_class_for(task_type)
    if args.export == "quantized":
        from ..quant import load_quantized

        reloaded = load_quantized(folder, model_class=auto).eval()
    elif os.path.isfile(os.path.join(folder, "structure.json")):
        from ..prune import load_structured

        reloaded = load_structured(folder).to(getattr(torch, args.dtype)).eval()
    else:
        reloaded = auto.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        out = _probe_logits(reloaded, probe, task_type)
        diff = float((out.float() - ref.float()).abs().max())
        if args.export == "quantized":  # the folder must hold exactly the merged model
            exact = float((out.float() - _probe_logits(merged.eval(), probe, task_type).float()).abs().max())
            if exact > 1e-4:
                raise PeftkitError(f"The reloaded quantized model differs from the merged model by {exact:.3e}, so "
                                   "nothing was written; use --export float.")
            print(f"verified: the reloaded folder equals the merged model (max abs diff {exact:.2e}); its logits "
                  f"differ from the adapter model's by {diff:.2e} (requantization)")
            return
    tol = 1e-3 if args.dtype == "float32" else 5e-2 * float(ref.float().abs().max())
    if diff > tol:
        raise PeftkitError(f"The merged model's output differs from the adapter model's by {diff:.3e} (more than "
                           f"{tol:.1e}), so nothing was written; use the adapter unmerged (peftkit generate / eval "
                           "--adapter), or --no-verify to write the merged model anyway.")
    print(f"verified: the reloaded merged model's logits match the adapter model's (max abs diff {diff:.2e})")


def _probe_logits(model: Any, probe: Any, task_type: str) -> Any:
    kwargs = dict(probe)
    if task_type == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = probe["input_ids"][:, :1]
    return model(**kwargs).logits
