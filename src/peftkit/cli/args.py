"""What the ``peftkit`` commands share: flags generated from dataclass fields (the string -> value converters, the
help formatter), the settings merge of ``peftkit train`` (``--config`` file, ``--set``, flags) and the small flag
helpers of the inference commands (adapter specs, ``--quantize``, ``--device``, new output folders written
through a staging folder)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import os
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Optional, Union

from ..errors import PeftkitError

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
                raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, allowed))}")
            return hit
        if str in scalars or any(isinstance(o, type) and issubclass(o, enum.Enum) for o in scalars) or Any in scalars:
            if Any in scalars or inner is Any:
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return text
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid {getattr(inner, '__name__', inner)}")

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
    from ..train.config import docstring_args

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
        if inner is bool:  # Optional[bool]: absent keeps the default (None), --x / --no-x set it
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


class UsageError(PeftkitError):
    """A command line argparse cannot parse (an unknown flag, a value of the wrong type, ...)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a :class:`UsageError`, printed by ``main``) that
    says what is wrong and where the flags are listed, not a usage dump and a SystemExit."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`.")


def int_at_least(low: int, flag: str):
    """An argparse ``type`` for integers >= ``low``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return convert


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=min(110, max(80, _term_width())))


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


# ---------------------------------------------------------------------------------------------
# settings of peftkit train: flags, --set and a --config file


def nest(namespace: argparse.Namespace) -> dict[str, Any]:
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
    from ..train.config import split_settings

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


# ---------------------------------------------------------------------------------------------
# flags of the inference commands (eval / generate / merge)


def adapter_specs(values: list[str]) -> list[tuple[str, str]]:
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


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["run", "none", "4", "8"], default="run",
                   help="load the base quantized: as the run that wrote the adapter did (run), in float (none), "
                        "NF4 (4) or int8 (8)")


def quantize_arg(value: str) -> Any:
    """``--quantize`` (one of its choices) as load_for_inference's ``quantize``: "run", None, 4 or 8."""
    if value == "none":
        return None
    return value if value == "run" else int(value)


def resolve_device(name: Optional[str]) -> Any:
    """``--device`` as a torch.device (default: the GPU if there is one); PeftkitError if torch cannot
    parse it or it names a GPU torch does not see."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..train.config import check_device

    check_device(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PeftkitError(f"--device {name} asks for a GPU but torch sees none; use --device cpu.")
    return device


def check_output_file(path: str, flag: str = "--output") -> None:
    """PeftkitError if a file cannot be written at ``path`` (a folder there, or no folder to hold it)."""
    if os.path.isdir(path):
        raise PeftkitError(f"{flag} {path} is a folder; give a file name.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise PeftkitError(f"{flag} {path}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise PeftkitError(f"{flag} {path}: the folder {parent} is not writable; choose another path.")


def check_new_output_dir(path: str) -> None:
    """PeftkitError unless ``path`` can become a new folder: not a file, not under one, and empty if it exists
    (the commands that write a model folder never overwrite one)."""
    from .._io import check_output_folder

    check_output_folder(path)
    if os.path.isdir(path) and os.listdir(path):
        raise PeftkitError(f"{path} exists and is not empty; choose a new --output-dir.")


@contextlib.contextmanager
def staging_folder(output_dir: str) -> Iterator[str]:
    """A hidden temporary folder beside ``output_dir`` to write into; renamed to ``output_dir`` when
    the block succeeds, removed (with any parent folders made for it) when it fails: a failed merge or
    verification leaves nothing behind."""
    import shutil
    import tempfile

    from .._io import dir_mode, fsync_dir, set_mode

    target = os.path.abspath(output_dir)
    parent = os.path.dirname(target)
    made = []
    probe = parent
    while not os.path.isdir(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(target)}-", dir=parent)
    try:
        set_mode(staging, dir_mode())
        yield staging
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked before the merge); a folder that filled up since is not replaced
        os.rename(staging, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # innermost first
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
