"""``peftkit inspect``: an adapter folder's config, parameter counts, sizes and tensor shapes (and the nearest
vocabulary tokens of a soft prompt's virtual tokens)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser


def cmd_inspect(argv: list[str]) -> int:
    from ..train.reporting import human_bytes

    p = Parser(prog=f"{PROG} inspect", formatter_class=Formatter,
                                description="Print an adapter's config, parameter counts, size on disk and tensor "
                                            "shapes (reads the files only), and for prompt tuning / P-tuning "
                                            "adapters the vocabulary tokens nearest to each virtual token (loads "
                                            "the base model).")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--model", help="base model for the total parameter count (default: the adapter's base model, "
                                   "when it is a local folder)")
    p.add_argument("--nearest", type=int, default=5, metavar="K",
                   help="prompt tuning / P-tuning adapters: also load the base model and print, for each virtual "
                        "token, the K vocabulary tokens nearest by cosine similarity (0: skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.nearest < 0:
        raise PeftkitError(f"--nearest must be >= 0, got {args.nearest}.")
    info = inspect_adapter(args.adapter, args.model)
    if args.nearest:
        for entry in info["adapters"]:
            if entry["config"].get("peft_type") in NEAREST_TOKEN_METHODS:
                entry["nearest_tokens"] = _nearest_tokens(entry, args.model, args.nearest)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for entry in info["adapters"]:
        print(f"== adapter {entry['name']!r} at {entry['path']}")
        print("   config:")
        for k, v in entry["config"].items():
            print(f"     {k}: {json.dumps(v)}")
        print(f"   parameters: {entry['parameters']:,} in {len(entry['tensors'])} tensors"
              + (f" ({100 * entry['parameters'] / entry['base_parameters']:.4f}% of the base model's "
                 f"{entry['base_parameters']:,})" if entry.get("base_parameters") else ""))
        print(f"   size on disk: {human_bytes(entry['bytes'])}")
        for f, b in entry["files"].items():
            print(f"     {f}: {human_bytes(b)}")
        print("   tensors:")
        width = max((len(t["name"]) for t in entry["tensors"]), default=0)
        for t in entry["tensors"]:
            print(f"     {t['name'].ljust(width)}  {str(tuple(t['shape'])):<14} {t['dtype']}")
        near = entry.get("nearest_tokens")
        if isinstance(near, str):
            print(f"   nearest vocabulary tokens: not computed ({near})")
        elif near:
            print("   nearest vocabulary tokens of each virtual token (cosine similarity):")
            for i, row in enumerate(near):
                print(f"     {i:>3}: " + ", ".join(f"{t['token']!r} {t['score']:.3f}" for t in row))
    return 0


# input-prompt methods: their virtual tokens live in the word-embedding space
NEAREST_TOKEN_METHODS = ("PROMPT_TUNING", "P_TUNING")


def _nearest_tokens(entry: dict[str, Any], model: Optional[str], k: int) -> Any:
    """``nearest_tokens`` of one prompt adapter as JSON-ready rows, or why it could not be computed."""
    from ..train.runner import load_for_inference

    base = model or entry["config"].get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        return f"the base model {base!r} is not a local folder here; pass --model"
    loaded = load_for_inference([(entry["name"], entry["path"])], model)
    rows = loaded.model.nearest_tokens(entry["name"], k=k, tokenizer=loaded.tokenizer)
    return [[{"token_id": t.token_id, "token": t.token, "score": round(t.score, 6)} for t in row] for row in rows]


def inspect_adapter(folder: str, model: Optional[str] = None) -> dict[str, Any]:
    """Config, tensor shapes, parameter counts and file sizes of an adapter folder (and its sub-adapters)."""
    from ..config import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    if not os.path.isdir(folder):
        raise PeftkitError(f"Adapter folder {folder} does not exist.")
    places = []
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        places.append(("default", folder))
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            places.append((name, sub))
    if not places:
        raise PeftkitError(f"{folder} has no {CONFIG_NAME}: it is not an adapter folder.")
    out = []
    for name, path in places:
        config = _read_config(os.path.join(path, CONFIG_NAME))
        tensors = _tensor_shapes(path, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
        files = {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, f))}
        entry = {"name": name, "path": path, "config": config, "tensors": tensors,
                 "parameters": sum(_numel(t["shape"]) for t in tensors), "files": files, "bytes": sum(files.values())}
        base = model or config.get("base_model_name_or_path")
        if base and os.path.isdir(base):
            entry["base_parameters"] = _count_base_params(base, config.get("task_type"))
        out.append(entry)
    return {"adapters": out}


def _read_config(path: str) -> dict[str, Any]:
    """An adapter_config.json as a dict; PeftkitError if it is not UTF-8 JSON holding an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except UnicodeDecodeError as exc:
        raise PeftkitError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); it is not an adapter "
                           "config.") from None
    except json.JSONDecodeError as exc:
        raise PeftkitError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise PeftkitError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields; it is not "
                           "an adapter config.")
    return config


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _tensor_shapes(path: str, safe_name: str, bin_name: str) -> list[dict[str, Any]]:
    safe = os.path.join(path, safe_name)
    if os.path.isfile(safe):
        from safetensors import safe_open

        try:
            with safe_open(safe, framework="pt") as fh:
                return [{"name": k, "shape": list(fh.get_slice(k).get_shape()), "dtype": str(fh.get_slice(k).get_dtype())}
                        for k in sorted(fh.keys())]
        except Exception as exc:  # safetensors raises its own error types
            raise PeftkitError(f"{safe} is corrupt or truncated ({exc}).") from None
    from .._io import load_tensors

    extra = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if os.path.isfile(os.path.join(path, bin_name)):
        tensors = load_tensors(os.path.join(path, bin_name))
    elif extra:
        tensors = load_tensors(os.path.join(path, extra[0]))
    else:
        raise PeftkitError(f"{path} has no adapter weights ({safe_name} or {bin_name}).")
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sorted(tensors.items())]


def _count_base_params(path: str, task_type: Optional[str]) -> Optional[int]:
    """Parameters of the base model, counted on the meta device (no weights are read)."""
    try:
        import torch
        import transformers

        from ..auto import auto_class_for

        cfg = transformers.AutoConfig.from_pretrained(path)
        auto = auto_class_for(task_type)
        with torch.device("meta"):
            try:
                m = auto.from_config(cfg)
            except ValueError:
                m = transformers.AutoModel.from_config(cfg)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # counting is best effort: a model transformers cannot build here
        return None
