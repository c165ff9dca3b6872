"""Config dataclasses shared by every method: :class:`PeftConfig`, :class:`PeftType`, :class:`TaskType`.

Configs are the single source of defaults. They validate on construction (types and values) and
read/write ``adapter_config.json`` exactly as Hugging Face PEFT does: ``dataclasses.asdict``, sets as
lists, ``json.dumps(..., indent=2, sort_keys=True)``. A file with fields this version does not know
loads with a :class:`~peftkit.errors.PeftkitWarning` listing them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from ._io import atomic_write_bytes, make_folder
from .errors import CheckpointError, ConfigError, ConfigTypeError, PeftkitWarning
from .hub import resolve_file
from .registry import config_class_for

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# The Hugging Face PEFT release whose format peftkit writes; written as ``peft_version`` so that
# either library reads our folders without a version warning.
COMPAT_PEFT_VERSION = "0.21.2"

# How deep dicts and lists may nest in a config value (a hostile file could nest thousands of levels
# and overflow the stack of json, deepcopy and asdict).
MAX_NESTING = 32


class PeftType(str, enum.Enum):
    """The method of an adapter. Values are the strings stored in ``adapter_config.json``."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LN_TUNING = "LN_TUNING"
    BOTTLENECK = "BOTTLENECK"
    BITFIT = "BITFIT"
    PARTIAL = "PARTIAL"
    # Hugging Face PEFT's other methods: named so that code and files mentioning them read, but a config
    # of one of these is refused with a clear error until peftkit implements it (docs/compat.md)
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"

    def __str__(self) -> str:
        return self.value


# modules added to modules_to_save automatically, per task type (when present in the model)
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


class TaskType(str, enum.Enum):
    """The task a model solves; picks the :class:`~peftkit.PeftModel` subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# ---------------------------------------------------------------------------------------------
# type checking of field values


def type_name(tp: Any) -> str:
    """A readable name of a type hint: ``int``, ``list[str] or str or None``, ``dict[str, int | float]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["None"] if type(None) in args else []))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def matches_type(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        args = typing.get_args(tp)
        return not args or all(matches_type(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(tp)
        return not args or all(matches_type(k, args[0]) and matches_type(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return isinstance(value, tp) or value in {m.value for m in tp}
        return isinstance(value, tp)
    return True


@dataclass
class PeftConfig:
    """Fields every adapter config has (the Hugging Face PEFT base fields).

    Args:
        peft_type: the method; set by each subclass.
        task_type: one of :class:`TaskType` or ``None`` for a plain ``nn.Module``.
        base_model_name_or_path: filled from the model when the adapter is saved.
        inference_mode: ``True`` freezes the adapter (set on save, and when loading without
            ``is_trainable``).

    Checks on construction, for every config: each field's type; no NaN or infinite float anywhere
    in a field (alpha, dropout, scaling: no field of any method takes one), nor values nested more
    than :data:`MAX_NESTING` levels; the regexes of :attr:`REGEX_FIELDS` compile; then the method's
    own :meth:`validate`. Each failure is a :class:`ConfigError` naming the field.
    """

    PEFT_TYPE: ClassVar[Optional[PeftType]] = None
    # Fields holding regexes: field -> (which values are regexes: "str" a string value (a list holds
    # plain module names), "all" a string or each string of a list, "keys" the keys of a dict; the
    # regex the code builds around the value, "{}" standing for it).
    REGEX_FIELDS: ClassVar[dict[str, tuple[str, str]]] = {"target_modules": ("str", "{}"),
                                                          "exclude_modules": ("str", "{}")}

    task_type: Optional[Union[TaskType, str]] = None
    peft_type: Optional[Union[PeftType, str]] = None
    auto_mapping: Optional[dict] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_version: Optional[str] = None

    def __post_init__(self) -> None:
        if self.PEFT_TYPE is not None:
            self.peft_type = self.PEFT_TYPE  # a given peft_type is overridden, as in Hugging Face PEFT
        elif self.peft_type is not None:
            self.peft_type = PeftType(str(self.peft_type)) if str(self.peft_type) in PeftType.__members__ else self.peft_type
        if self.task_type is not None:
            if str(self.task_type) not in TaskType.__members__:
                raise ConfigError(
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                    f"{', '.join(TaskType.__members__)}. (Or None for a plain module.)"
                )
            self.task_type = TaskType(str(self.task_type))
        if self.peft_version is None:
            self.peft_version = COMPAT_PEFT_VERSION
        self._check_values()
        self._check_types()
        self._check_regexes()
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            if not matches_type(value, tp):
                raise ConfigTypeError(
                    f"{type(self).__name__}.{f.name} must be of type {type_name(tp)}, got "
                    f"{type(value).__name__} {value!r}."
                )

    def _check_values(self) -> None:
        """No NaN/inf float in any field (inside lists and dicts too), nothing nested too deep."""
        for f in dataclasses.fields(self):
            stack = [(f.name, getattr(self, f.name), 0)]
            while stack:
                where, value, depth = stack.pop()
                if depth > MAX_NESTING:
                    raise ConfigError(f"{type(self).__name__}.{f.name} nests lists/dicts more than {MAX_NESTING} levels "
                                      "deep; no config field takes such a value.")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{type(self).__name__}.{where} must be a finite number, got {value!r}.")
                if isinstance(value, dict):
                    stack += [(f"{where}[{k!r}]", v, depth + 1) for k, v in value.items()]
                elif isinstance(value, (list, tuple, set, frozenset)):
                    stack += [(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]

    def _check_regexes(self) -> None:
        """Every regex of :attr:`REGEX_FIELDS` compiles, as the code uses it."""
        for name, (kind, template) in self.REGEX_FIELDS.items():
            value = getattr(self, name, None)
            if kind == "keys":
                patterns = list(value) if isinstance(value, dict) else []
            elif isinstance(value, str):
                patterns = [value]
            else:
                patterns = list(value) if kind == "all" and isinstance(value, (list, tuple, set, frozenset)) else []
            for pattern in patterns:
                try:
                    re.compile(template.replace("{}", pattern))
                except re.error as exc:
                    hint = (" (or give a list of module names, matched exactly or as a dotted suffix)"
                            if kind == "str" else "")
                    raise ConfigError(f"{type(self).__name__}.{name}: {pattern!r} is not a valid regular expression "
                                      f"({exc.msg}); fix the pattern{hint}.") from None
                except TypeError:
                    continue  # not a string: _check_types reports it

    def validate(self) -> None:
        """Check field values; subclasses extend. Raises :class:`ConfigError`."""

    def replace(self, **changes: Any) -> "PeftConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, (set, frozenset)):
                out[key] = sorted(value)
            elif isinstance(value, enum.Enum):
                out[key] = value.value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike, **overrides: Any) -> None:
        """Write ``adapter_config.json`` (atomically) into ``save_directory``."""
        make_folder(save_directory)
        data = self.to_dict()
        data.update(overrides)
        text = json.dumps(data, indent=2, sort_keys=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "PeftConfig":
        """Build the config class named by ``data["peft_type"]`` (or ``cls``); unknown keys warn."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        data = dict(data)
        peft_type = data.get("peft_type")
        if cls.PEFT_TYPE is None:
            if peft_type is None:
                raise ConfigTypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                                      f"{{'peft_type'}}. ({source} has no 'peft_type'; it is not an adapter config.)")
            target = config_class_for(peft_type)
        else:
            target = cls
            if peft_type is None:
                raise ConfigTypeError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                                      f"{{'peft_type'}}. ({source} has no 'peft_type'; it is not an adapter config.)")
            if peft_type is not None and str(peft_type) != str(cls.PEFT_TYPE):
                raise ConfigError(
                    f"{source} is a {peft_type} adapter config, not {cls.PEFT_TYPE}: load it with "
                    "PeftConfig.from_pretrained, which picks the config class from peft_type."
                )
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {target.__name__}, these are ignored. ({source}: "
                "this peftkit version does not know these fields; the file was probably written by a newer library "
                "version.)",
                PeftkitWarning,
                stacklevel=3,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return target(**kwargs)
        except TypeError as exc:  # e.g. a field given positionally wrong
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> "PeftConfig":
        """Read ``adapter_config.json`` from a local folder or a Hub repository id."""
        path = resolve_file(
            pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        return cls.from_dict(cls.from_json_file(path), source=str(path))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The fields stored in a config file, as a dict (Hugging Face PEFT's contract; build the config
        with :meth:`from_dict` or :meth:`from_pretrained`). A stray ``runtime_config`` entry is dropped."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise CheckpointError(f"No adapter config at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated.") from None
        except RecursionError:
            raise CheckpointError(f"{path} nests JSON values too deeply to read; it is not an adapter config "
                                  "(corrupt or hostile file).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}.")
        data.pop("runtime_config", None)
        return data


def positive_int(config: PeftConfig, name: str, value: Any, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{type(config).__name__}.{name} must be an integer {bound}, got {value!r}.")


def probability(config: PeftConfig, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{type(config).__name__}.{name} must be in [0, 1), got {value!r}.")


def unsupported(config: PeftConfig, name: str, value: Any, default: Any, why: str = "") -> None:
    """Fields of the Hugging Face format that peftkit keeps (for round trips) but does not implement."""
    if value != default and not (default is None and value in ({}, [], None)):
        raise ConfigError(
            f"{type(config).__name__}.{name}={value!r} is not supported by peftkit"
            + (f" ({why})" if why else "")
            + f"; leave it at {default!r}."
        )


# ---------------------------------------------------------------------------------------------
# soft-prompt methods (their shared fields)

# task types whose models know where virtual tokens go
PROMPT_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the soft-prompt methods (Hugging Face ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: the prompt length ``n`` (> 0; may be left None until the config is used).
        token_dim: the width of a virtual token; filled from the model (its hidden size; for prefix
            tuning ``num_kv_heads·head_dim``).
        num_transformer_submodules: 2 for ``SEQ_2_SEQ_LM``, else 1 (filled from ``task_type``).
        num_attention_heads: attention heads (key/value heads for prefix tuning on GQA models).
        num_layers: transformer layers (decoder layers for encoder-decoder prefix tuning).
        modules_to_save: modules trained in full beside the prompt; ``classifier``/``score`` are added
            for ``SEQ_CLS`` and ``TOKEN_CLS``.
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def validate(self) -> None:
        name = type(self).__name__
        if self.num_virtual_tokens is not None:  # None until used, as in Hugging Face PEFT (check_ready)
            positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        for field_name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None:
                positive_int(self, field_name, value)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"{name}.num_transformer_submodules must be 1, 2 or None, got "
                              f"{self.num_transformer_submodules!r}.")

    def check_ready(self) -> None:
        """ConfigError unless the config can build a model: ``num_virtual_tokens`` set and a task type
        the soft-prompt models run (checked here, not on construction, as Hugging Face PEFT accepts any
        task type in a config)."""
        name = type(self).__name__
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{name}.num_virtual_tokens is required: the number of virtual tokens (an integer > 0).")
        if self.task_type is not None and str(self.task_type) not in PROMPT_TASKS:
            raise ConfigError(f"{name}: task_type {self.task_type} is not supported by prompt-learning methods; use "
                              f"one of {', '.join(PROMPT_TASKS)}.")

    @property
    def uses_kv_prefix(self) -> bool:
        """True for methods that act on attention keys/values (prefix tuning), False for input prompts."""
        return False


def enum_field(config: PeftConfig, name: str, enum_cls: type[enum.Enum]) -> None:
    """Turn field ``name`` of ``config`` into a member of ``enum_cls`` (ConfigError listing the choices)."""
    value = getattr(config, name)
    try:
        setattr(config, name, enum_cls(str(value)))
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}.") from None


def as_set(value: Any) -> Any:
    """Lists, tuples and sets as a set (Hugging Face PEFT's form of ``target_modules``); else as is.
    JSON stores the set as a sorted list (:meth:`PeftConfig.to_dict`)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return set(value)
    return value


def as_list(value: Any) -> Any:
    """Sets (sorted) and tuples as lists, for config fields that JSON stores as lists; else as is."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


__all__ = [
    "CONFIG_NAME",
    "MAX_NESTING",
    "PROMPT_TASKS",
    "SAFETENSORS_WEIGHTS_NAME",
    "TASK_HEADS",
    "WEIGHTS_NAME",
    "PeftConfig",
    "PeftType",
    "PromptLearningConfig",
    "TaskType",
    "as_list",
    "config_class_for",
    "enum_field",
    "matches_type",
    "positive_int",
    "probability",
    "unsupported",
]
