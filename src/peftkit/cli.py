"""The ``peftkit`` command: ``train``, ``eval``, ``generate``, ``merge``, ``inspect``.

Every flag of ``peftkit train`` is generated from a config dataclass: :class:`~peftkit.train.ModelArgs`,
:class:`~peftkit.train.DataConfig`, :class:`~peftkit.train.TrainConfig` and the chosen method's own
config (``--method lora`` adds ``--r``, ``--lora-alpha``, ``--target-modules``, ...; ``--method
prompt-tuning`` adds ``--num-virtual-tokens``, ...). ``--config run.yaml`` sets the same fields from a
file; flags given on the command line win over the file, and the file wins over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import types
import typing
from typing import Any, Literal, Optional, Union

from .errors import PeftkitError

PROG = "peftkit"


# ---------------------------------------------------------------------------------------------
# flags from dataclass fields


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return tp, False


def _union_args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


_REGEX_CHARS = set("*()[]|\\^$+?{}")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_mapping(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"expected key=value pairs, got {part!r}")
        key, value = part.split("=", 1)
        value = value.strip()
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        return _parse_bool(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return text
    raise ValueError


_NO_MATCH = object()


def _literal_value(text: str, allowed: tuple) -> Any:
    """The allowed Literal value written as ``text`` (``"8"`` gives ``8`` for ``Literal[4, 8]``)."""
    for value in allowed:
        if text == str(value):
            return value
    return _NO_MATCH


def converter(tp: Any, name: str):
    """A string -> value function for the annotation ``tp`` (None for "none" where allowed)."""
    inner, optional = _strip_optional(tp)
    options = _union_args(inner)

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null"):
            return None
        # lists (comma separated) where the type allows one, unless a plain scalar fits better
        list_types = [o for o in options if typing.get_origin(o) in (list, tuple, set)]
        scalars = [o for o in options if o not in list_types]
        if any(typing.get_origin(o) is dict or o is dict for o in options):
            return _parse_mapping(text)
        if list_types:
            item = (typing.get_args(list_types[0]) or (str,))[0]
            keep_str = str in scalars and ("," not in text and (text == "all-linear" or set(text) & _REGEX_CHARS))
            one_scalar = [s for s in scalars if s in (int,)] and "," not in text
            if not keep_str and not one_scalar:
                return [_scalar(p.strip(), item if item in (int, float, str) else str)
                        for p in text.split(",") if p.strip()]
        for o in scalars:
            if typing.get_origin(o) is Literal:
                hit = _literal_value(text, typing.get_args(o))
                if hit is not _NO_MATCH:
                    return hit
                continue
            for cand in (bool, int, float):  # the most specific number type first
                if o is cand:
                    try:
                        return _scalar(text, o)
                    except ValueError:
                        break
        if typing.get_origin(inner) is Literal:
            allowed = typing.get_args(inner)
            hit = _literal_value(text, allowed)
            if hit is _NO_MATCH:
                raise argparse.ArgumentTypeError(f"{name}: choose from {', '.join(map(str, allowed))}")
            return hit
        if str in scalars or any(isinstance(o, type) and issubclass(o, enum.Enum) for o in scalars) or Any in scalars:
            if Any in scalars or inner is Any:
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return text
            return text
        raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a valid {getattr(inner, '__name__', inner)}")

    return convert


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "[]"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


def add_dataclass_flags(parser: argparse._ActionsContainer, cls: type, *, dest_prefix: str = "",
                        skip: set[str] = frozenset(), defaults: Optional[dict[str, Any]] = None,
                        taken: Optional[set[str]] = None, flag_prefix: str = "") -> list[str]:
    """Add one flag per field of ``cls``; return the field names added. Values land in ``dest_prefix + name``.

    Fields without a line in the class docstring's ``Args:`` are accepted but hidden from ``--help``.
    """
    from .train.config import docstring_args

    docs = docstring_args(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        flag = _flag(flag_prefix + f.name)
        if taken is not None:
            if flag in taken:
                continue
            taken.add(flag)
        tp = hints.get(f.name, Any)
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        doc = docs.get(f.name)
        if doc is None:
            help_text = argparse.SUPPRESS
        elif "default:" in doc.lower():
            help_text = doc
        else:
            help_text = f"{doc} (default: {_default_text(default)})"
        help_text = help_text.replace("%", "%%") if doc is not None else help_text
        inner, optional = _strip_optional(tp)
        dest = dest_prefix + f.name
        names = [flag] + ([_flag(flag_prefix + f.name).replace("-", "_").replace("__", "--", 1)]
                          if "_" in f.name else [])
        if inner is bool and not optional:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            metavar = None
            if typing.get_origin(inner) is Literal:
                metavar = "{" + ",".join(map(str, typing.get_args(inner))) + "}"
            parser.add_argument(*names, dest=dest, type=converter(tp, flag), default=argparse.SUPPRESS,
                                help=help_text, metavar=metavar or f.name.upper())
        added.append(f.name)
    return added


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=min(110, max(80, _term_width())))


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


# ---------------------------------------------------------------------------------------------
# peftkit train


TRAIN_EPILOG = """\
examples:
  peftkit train                                   # LoRA on the bundled model and demo data (minutes on a CPU)
  peftkit train --method dora --r 16 --max-steps 200 --output-dir runs/dora
  peftkit train --model ./my-model --data train.jsonl --eval-data dev.jsonl --columns source=mr,target=ref
  peftkit train --config run.yaml --lr 5e-4          # flags override the file
  peftkit train --output-dir runs/x --resume         # continue from the newest complete checkpoint
  torchrun --nproc_per_node=2 -m peftkit train --batch-size 32 ...   # data parallel, same global batch

Method fields: `peftkit train --method NAME --help` lists the flags of that method.
"""


def _preparse_method(argv: list[str]) -> tuple[str, Optional[dict[str, Any]]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    file_values = None
    method = known.method
    if known.config:
        from .train.config import load_yaml

        file_values = load_yaml(known.config)
        if method is None:
            section = file_values.get("model")
            method = section.get("method") if isinstance(section, dict) else None
            method = method or file_values.get("method")
    return str(method or "lora"), file_values


def build_train_parser(method: str = "lora") -> argparse.ArgumentParser:
    from .train.config import DataConfig, ModelArgs, TrainConfig
    from .train.modeling import BASE_FIELDS, method_names, resolve_method

    names = sorted(method_names())
    parser = argparse.ArgumentParser(
        prog=f"{PROG} train", formatter_class=_Formatter, epilog=TRAIN_EPILOG, allow_abbrev=False,
        description="Fine-tune a model with a PEFT method and save the adapter, metrics, a loss plot, the resolved "
                    "settings and resumable checkpoints into --output-dir.")
    parser.add_argument("--config", metavar="RUN.YAML", help="read settings from a YAML file (flat keys or the "
                        "model/data/train/method_args sections of a run.yaml); flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                        help="set any field by name, the value read as YAML (e.g. --set r=16 --set "
                             "target_modules=[q_proj,v_proj]); repeatable. Handy under torchrun, whose own flags "
                             "shadow short ones such as --r")
    taken = {"--config", "--help", "-h", "--set"}
    g = parser.add_argument_group("model and method")
    g.add_argument("--method", dest="model.method", metavar="{" + ",".join(names) + "}", default=argparse.SUPPRESS,
                   help=f"the PEFT method; one of: {', '.join(names)} (default: lora)")
    taken.add("--method")
    add_dataclass_flags(g, ModelArgs, dest_prefix="model.", skip={"method"}, taken=taken)
    try:
        canonical, cls, overrides = resolve_method(method)
    except PeftkitError:
        canonical, cls, overrides = None, None, {}
    if cls is not None:
        mg = parser.add_argument_group(f"{canonical} ({cls.__name__} fields)")
        ours = {f.name for f in dataclasses.fields(ModelArgs)} | {f.name for f in dataclasses.fields(DataConfig)} | \
            {f.name for f in dataclasses.fields(TrainConfig)}
        skip = set(BASE_FIELDS) - {"modules_to_save"}
        clash = {f.name for f in dataclasses.fields(cls)} & ours
        add_dataclass_flags(mg, cls, dest_prefix="method_args.", skip=skip | clash, defaults=overrides, taken=taken)
        if clash:  # a method field named like a toolkit field gets a --method- prefix
            sub = dataclasses.make_dataclass("_Clash", [(f.name, f.type, f) for f in dataclasses.fields(cls)
                                                        if f.name in clash])
            sub.__doc__ = cls.__doc__
            add_dataclass_flags(mg, sub, dest_prefix="method_args.", taken=taken, flag_prefix="method_")
    add_dataclass_flags(parser.add_argument_group("data"), DataConfig, dest_prefix="data.", taken=taken)
    add_dataclass_flags(parser.add_argument_group("training"), TrainConfig, dest_prefix="train.", taken=taken)
    return parser


def _nest(namespace: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(namespace).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def parse_set_values(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` items as a flat dict, each value parsed as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise PeftkitError(f"--set {item!r}: expected KEY=VALUE.")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise PeftkitError(f"--set {item!r}: the value is not valid YAML ({exc}).") from None
    return out


def merge_settings(file_values: Optional[dict[str, Any]], flag_values: dict[str, Any],
                   set_values: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Defaults < file < ``--set`` < flags, as one nested dict for RunConfig.from_dict."""
    from .train.config import split_settings

    merged: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}, "method_args": {}}
    for values, source in ((file_values, "--config file"), (set_values, "--set")):
        if not values:
            continue
        values = {k: v for k, v in values.items() if k != "resolved"}
        sections, method_args = split_settings(values, source)
        for name, sec in sections.items():
            merged[name].update(sec)
        merged["method_args"].update(method_args)
    for name, sec in flag_values.items():
        merged.setdefault(name, {}).update(sec)
    return merged


def cmd_train(argv: list[str]) -> int:
    from .train.config import RunConfig
    from .train.runner import train

    method, file_values = _preparse_method(argv)
    parser = build_train_parser(method)
    args = parser.parse_args(argv)
    flags, set_values = _nest(args), parse_set_values(args.set_values)
    settings = merge_settings(file_values, flags, set_values)
    if not settings["model"].get("model") and not settings["data"].get("data"):
        # the demo run: bundled model and data, with the demo's settings under the user's
        from .train.config import demo_settings

        preset, user = demo_settings(), settings
        settings = merge_settings(preset, {}, None)
        for name, section in user.items():
            settings.setdefault(name, {}).update(section)
        if _is_main():
            shown = ", ".join(f"{k}={v}" for sec in preset.values() if isinstance(sec, dict) for k, v in sec.items())
            print(f"== demo run: the bundled stories260k model and E2E NLG data; demo settings "
                  f"(peftkit/assets/data/demo.yaml, under yours): {shown}")
    run = RunConfig.from_dict(settings, source="settings")
    result = train(run)
    if result.output_dir and _is_main():
        after = "  ".join(f"{k}={v:.4f}" for k, v in result.metrics_after.items())
        print(f"done: {result.steps} steps; {after}")
        written = [n + ("/" if os.path.isdir(os.path.join(result.output_dir, n)) else "")
                   for n in sorted(os.listdir(result.output_dir))]
        print(f"wrote {result.output_dir}/: {' '.join(written)}")
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# eval / generate / merge / inspect


def _adapter_specs(values: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, spec in enumerate(values or []):
        if "=" in spec and not os.path.exists(spec):
            name, path = spec.split("=", 1)
        else:
            name, path = ("default" if i == 0 else os.path.basename(os.path.normpath(spec)) or f"adapter{i}"), spec
            if name == "adapter":
                name = os.path.basename(os.path.dirname(os.path.abspath(spec))) or f"adapter{i}"
            if i == 0:
                name = name if len(values) > 1 else "default"
        if any(n == name for n, _ in out):
            raise PeftkitError(f"Two adapters are named {name!r}; name them with NAME=PATH.")
        out.append((name, path))
    return out


def _add_quantize_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["run", "none", "4", "8"], default="run",
                   help="load the base quantized: as the run that wrote the adapter did (run), in float (none), "
                        "NF4 (4) or int8 (8)")


def _quantize_arg(value: str) -> Any:
    """``--quantize`` (one of its choices) as load_for_inference's ``quantize``: "run", None, 4 or 8."""
    if value == "none":
        return None
    return value if value == "run" else int(value)


def _device(name: Optional[str]) -> Any:
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_eval(argv: list[str]) -> int:
    from .train.config import DataConfig
    from .train.data import prepare_data
    from .train.loop import evaluate
    from .train.runner import load_for_inference

    p = argparse.ArgumentParser(prog=f"{PROG} eval", formatter_class=_Formatter,
                                description="Compute the task metrics (loss/perplexity, accuracy/F1, exact match/"
                                            "ROUGE-L) of a model with an adapter on a data file.")
    p.add_argument("adapter_pos", nargs="?", metavar="ADAPTER", help="adapter folder (same as --adapter)")
    p.add_argument("--adapter", help="adapter folder (leave out to evaluate the base model)")
    p.add_argument("--model", help="base model folder or Hub id (default: the adapter's base model)")
    p.add_argument("--data", help="data file (default: the eval data of the run that wrote the adapter)")
    p.add_argument("--format", choices=["text", "instruction", "chat", "classification", "seq2seq"],
                   help="data format (default: the run's, else detected)")
    p.add_argument("--columns", type=converter(dict[str, str], "--columns"), help="field=column pairs")
    p.add_argument("--max-length", type=int, help="longest example in tokens")
    p.add_argument("--max-samples", type=int, help="evaluate at most this many examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--generate-samples", type=int, default=32,
                   help="examples scored by generation for exact match and ROUGE-L (generation tasks; 0: none)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", help="cpu, cuda, ... (default: GPU if available)")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    _add_quantize_flag(p)
    args = p.parse_args(argv)
    adapter = args.adapter or args.adapter_pos
    device = _device(args.device)
    loaded = load_for_inference([("default", adapter)] if adapter else [], args.model, device=device,
                                quantize=_quantize_arg(args.quantize))
    cfg: DataConfig = loaded.data_config
    changes: dict[str, Any] = {}
    if args.format:
        changes["format"] = args.format
    if args.columns:
        changes["columns"] = args.columns
    if args.max_length:
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
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(args.output, json.dumps({"data": data_path, "adapter": adapter, **metrics}, indent=2).encode())
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .train.data import format_prompt
    from .train.loop import generate_texts
    from .train.runner import data_config_of, load_for_inference, read_run_file

    p = argparse.ArgumentParser(
        prog=f"{PROG} generate", formatter_class=_Formatter,
        description="Generate completions for prompts with one or several adapters. All rows (prompt x adapter) run "
                    "as one mixed batch: each row through its own adapter.",
        epilog="examples:\n"
               "  peftkit generate --adapter runs/a/adapter --prompt 'name[Aromi], eatType[coffee shop]'\n"
               "  peftkit generate --adapter a=runs/a/adapter --adapter b=runs/b/adapter --base --prompt 'Once upon'\n"
               "  peftkit generate --adapter a=A --adapter b=B --prompt p1 --prompt p2 --prompt-adapter a "
               "--prompt-adapter b")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="an adapter folder (repeat for several)")
    p.add_argument("--model", help="base model (default: the first adapter's base model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--prompt-adapter", action="append", default=[], metavar="NAME",
                   help="the adapter of each prompt, in order (base for none); default: every prompt with every adapter")
    p.add_argument("--base", action="store_true", help="also generate with the base model (no adapter)")
    p.add_argument("--raw", action="store_true", help="use the prompts as they are, not in the training data's "
                   "prompt format")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device")
    _add_quantize_flag(p)
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as fh:
                prompts += [line.rstrip("\n") for line in fh if line.strip()]
        except FileNotFoundError:
            raise PeftkitError(f"Prompts file {args.prompts_file} does not exist.") from None
    if not prompts:
        raise PeftkitError("Give at least one --prompt (or --prompts-file).")
    specs = _adapter_specs(args.adapter)
    device = _device(args.device)
    loaded = load_for_inference(specs, args.model, device=device, quantize=_quantize_arg(args.quantize))
    names = [n for n, _ in specs]
    from .core.mixed import BASE_ADAPTER

    if args.prompt_adapter:
        if len(args.prompt_adapter) != len(prompts):
            raise PeftkitError(f"{len(args.prompt_adapter)} --prompt-adapter values for {len(prompts)} prompts; give "
                               "one per prompt.")
        rows = [(i, BASE_ADAPTER if a in ("base", BASE_ADAPTER) else a) for i, a in enumerate(args.prompt_adapter)]
        unknown = sorted({a for _, a in rows if a != BASE_ADAPTER and a not in names})
        if unknown:
            raise PeftkitError(f"--prompt-adapter names {unknown} are not among the adapters {names}.")
    else:
        cols = (names or []) + ([BASE_ADAPTER] if args.base or not names else [])
        rows = [(i, a) for i in range(len(prompts)) for a in cols]
    # each adapter's prompt format comes from its run.yaml
    formats: dict[str, tuple[Any, Any]] = {}
    for name, folder in specs:
        run = read_run_file(folder)
        fmt = ((run or {}).get("data") or {}).get("format")
        formats[name] = (fmt, loaded.data_config if run is None else data_config_of(run))
    first = formats[names[0]] if names else (None, loaded.data_config)
    ids = []
    for i, a in rows:
        fmt, dcfg = formats.get(a, first)
        ids.append(format_prompt(prompts[i], None if args.raw else fmt, loaded.tokenizer, dcfg, loaded.task_type))
    adapter_names = [a for _, a in rows] if names else None
    texts = generate_texts(loaded.model, loaded.tokenizer, ids, loaded.task_type, device,
                           max_new_tokens=args.max_new_tokens, adapter_names=adapter_names)
    for i, prompt in enumerate(prompts):
        print(f"== prompt {i + 1}: {prompt}")
        for (j, a), text in zip(rows, texts):
            if j == i:
                label = "base" if a == BASE_ADAPTER else a
                print(f"   [{label}] {text}")
    return 0


def cmd_merge(argv: list[str]) -> int:
    import warnings

    import torch

    from .quant import is_quantized_module
    from .train.reporting import folder_bytes, human_bytes
    from .train.runner import load_for_inference

    p = argparse.ArgumentParser(prog=f"{PROG} merge", formatter_class=_Formatter,
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
    _add_quantize_flag(p)
    p.add_argument("--safe-merge", action="store_true", help="check the merged weights for NaN before writing")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing the merged model's output with the adapter model's")
    args = p.parse_args(argv)
    adapter = args.adapter or args.adapter_pos
    if not adapter:
        raise PeftkitError("Give the adapter folder to merge.")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise PeftkitError(f"{args.output_dir} exists and is not empty; choose a new --output-dir.")
    loaded = load_for_inference([("default", adapter)], args.model, dtype=args.dtype,
                                quantize=_quantize_arg(args.quantize))
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
    if args.export == "quantized":
        from .quant import save_quantized

        save_quantized(merged, args.output_dir)
        what = "a quantized model for peftkit.load_quantized, with the adapter merged in"
    else:
        merged.save_pretrained(args.output_dir)
        what = f"a {type(merged).__name__} with the adapter merged in" + (" (base dequantized)" if quantized else "")
    tok.save_pretrained(args.output_dir)
    print(f"wrote {args.output_dir} ({human_bytes(folder_bytes(args.output_dir))}): {what}")
    if args.verify:
        from .auto import auto_class_for

        auto = auto_class_for(loaded.task_type)
        if args.export == "quantized":
            from .quant import load_quantized

            reloaded = load_quantized(args.output_dir, model_class=auto).eval()
        else:
            reloaded = auto.from_pretrained(args.output_dir, dtype=getattr(torch, args.dtype)).eval()
        with torch.no_grad():
            out = _probe_logits(reloaded, probe, loaded.task_type)
            diff = float((out.float() - ref.float()).abs().max())
            if args.export == "quantized":  # the folder must hold exactly the merged model
                exact = float((out.float() - _probe_logits(merged.eval(), probe, loaded.task_type).float()).abs().max())
                if exact > 1e-4:
                    raise PeftkitError(f"The reloaded quantized model differs from the merged model by {exact:.3e}.")
                print(f"verified: the reloaded folder equals the merged model (max abs diff {exact:.2e}); its logits "
                      f"differ from the adapter model's by {diff:.2e} (requantization)")
                return 0
        print(f"verified: the reloaded merged model's logits match the adapter model's (max abs diff {diff:.2e})")
        tol = 1e-3 if args.dtype == "float32" else 5e-2 * float(ref.float().abs().max())
        if diff > tol:
            raise PeftkitError(f"The merged model's output differs from the adapter model's by {diff:.3e}.")
    return 0


def _probe_logits(model: Any, probe: Any, task_type: str) -> Any:
    kwargs = dict(probe)
    if task_type == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = probe["input_ids"][:, :1]
    return model(**kwargs).logits


def cmd_inspect(argv: list[str]) -> int:
    from .train.reporting import human_bytes

    p = argparse.ArgumentParser(prog=f"{PROG} inspect", formatter_class=_Formatter,
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
    from .train.runner import load_for_inference

    base = model or entry["config"].get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        return f"the base model {base!r} is not a local folder here; pass --model"
    loaded = load_for_inference([(entry["name"], entry["path"])], model)
    rows = loaded.model.nearest_tokens(entry["name"], k=k, tokenizer=loaded.tokenizer)
    return [[{"token_id": t.token_id, "token": t.token, "score": round(t.score, 6)} for t in row] for row in rows]


def inspect_adapter(folder: str, model: Optional[str] = None) -> dict[str, Any]:
    """Config, tensor shapes, parameter counts and file sizes of an adapter folder (and its sub-adapters)."""
    from .config import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

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
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as fh:
            try:
                config = json.load(fh)
            except json.JSONDecodeError as exc:
                raise PeftkitError(f"{path}/{CONFIG_NAME} is not valid JSON ({exc}).") from None
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
    from .checkpoint import load_tensors

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

        from .auto import auto_class_for

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


# ---------------------------------------------------------------------------------------------

COMMANDS = {
    "train": (cmd_train, "fine-tune a model with a PEFT method (default: LoRA on the bundled model and data)"),
    "eval": (cmd_eval, "compute task metrics of a model + adapter on a data file"),
    "generate": (cmd_generate, "generate with one or several adapters (mixed batches)"),
    "merge": (cmd_merge, "merge an adapter into a standalone Hugging Face model folder"),
    "inspect": (cmd_inspect, "print an adapter's config, parameter counts, size, tensor shapes (and a soft "
                           "prompt's nearest tokens)"),
}


def _usage() -> str:
    from . import __version__

    lines = [f"usage: {PROG} <command> [options]   (peftkit {__version__})", "",
             "Parameter-efficient fine-tuning from the command line.", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"Run `{PROG} <command> --help` for a command's flags. `{PROG} train` with no flags fine-tunes the",
              "bundled stories260k model with LoRA on bundled E2E NLG demo data (a few minutes on a CPU)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"peftkit {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        from .errors import closest

        hint = closest(command, COMMANDS)
        print(f"{PROG}: unknown command {command!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](argv[1:]) or 0
    except PeftkitError as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
