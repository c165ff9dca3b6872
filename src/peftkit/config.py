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
import os
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

from ._io import atomic_write_bytes
from .errors import CheckpointError, ConfigError, PeftkitWarning
from .hub import resolve_file
from .registry import config_class_for

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# The Hugging Face PEFT release whose format peftkit writes; written as ``peft_version`` so that
# either library reads our folders without a version warning.
COMPAT_PEFT_VERSION = "0.21.2"


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
    """

    PEFT_TYPE: ClassVar[Optional[PeftType]] = None

    task_type: Optional[Union[TaskType, str]] = None
    peft_type: Optional[Union[PeftType, str]] = None
    auto_mapping: Optional[dict] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_version: Optional[str] = None

    def __post_init__(self) -> None:
        if self.PEFT_TYPE is not None:
            if self.peft_type is not None and str(self.peft_type) != str(self.PEFT_TYPE):
                raise ConfigError(
                    f"{type(self).__name__} is for peft_type {self.PEFT_TYPE}, got peft_type={self.peft_type!r}."
                )
            self.peft_type = self.PEFT_TYPE
        elif self.peft_type is not None:
            self.peft_type = PeftType(str(self.peft_type)) if str(self.peft_type) in PeftType.__members__ else self.peft_type
        if self.task_type is not None:
            if str(self.task_type) not in TaskType.__members__:
                raise ConfigError(
                    f"Invalid task_type {self.task_type!r}; use one of {', '.join(TaskType.__members__)} or None."
                )
            self.task_type = TaskType(str(self.task_type))
        if self.peft_version is None:
            self.peft_version = COMPAT_PEFT_VERSION
        self._check_types()
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            if not matches_type(value, tp):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} must be of type {type_name(tp)}, got "
                    f"{type(value).__name__} {value!r}."
                )

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
        if os.path.isfile(save_directory):
            raise CheckpointError(f"{save_directory} is a file; pass a directory to save the config into.")
        os.makedirs(save_directory, exist_ok=True)
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
                raise ConfigError(f"{source} has no 'peft_type'; it is not an adapter config.")
            target = config_class_for(peft_type)
        else:
            target = cls
            if peft_type is not None and str(peft_type) != str(cls.PEFT_TYPE):
                raise ConfigError(
                    f"{source} is a {peft_type} adapter config, not {cls.PEFT_TYPE}: load it with "
                    "PeftConfig.from_pretrained, which picks the config class from peft_type."
                )
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{source}: ignoring fields this peftkit version does not know: {', '.join(unknown)}. "
                "The file was probably written by a newer library version.",
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
        return cls.from_json_file(path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PeftConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise CheckpointError(f"No adapter config at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt or truncated.") from None
        return cls.from_dict(data, source=str(path))


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
        num_virtual_tokens: the prompt length ``n`` (required, > 0).
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
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{name}.num_virtual_tokens is required: the number of virtual tokens (an integer > 0).")
        positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        for field_name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None:
                positive_int(self, field_name, value)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"{name}.num_transformer_submodules must be 1, 2 or None, got "
                              f"{self.num_transformer_submodules!r}.")
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


def as_list(value: Any) -> Any:
    """Sets (sorted) and tuples as lists, for config fields that JSON stores as lists; else as is."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


__all__ = [
    "CONFIG_NAME",
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
