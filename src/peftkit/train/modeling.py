"""Methods by name, their configs from settings, and loading a model and tokenizer for a task.

Method names come from the library's registry (:mod:`peftkit.registry`): every registered method
gives a name, its ``peft_type`` in lower case with ``-`` (``lora``, ``ia3``, ``prompt-tuning``, ...),
and its record's aliases more (``dora`` is LoRA with ``use_dora=True``). A method added to the
library shows up here with no change to the toolkit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from ..config import PeftConfig, TaskType
from ..errors import ConfigError, PeftkitError, closest
from ..auto import auto_class_for
from ..registry import all_methods

# fields of the PeftConfig base class the toolkit sets itself
BASE_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}

def method_names() -> dict[str, tuple[type[PeftConfig], dict[str, Any]]]:
    """Every method name the ``--method`` flag accepts -> (config class, default overrides): one per
    registered method, plus the aliases its record declares (``dora``)."""
    registry = all_methods()
    out: dict[str, tuple[type[PeftConfig], dict[str, Any]]] = {}
    for peft_type, method in sorted(registry.items()):
        out[peft_type.lower().replace("_", "-")] = (method.config_cls, {})
    for peft_type, method in sorted(registry.items()):
        fields = {x.name for x in dataclasses.fields(method.config_cls)}
        for alias, overrides in method.aliases.items():
            if all(f in fields for f in overrides):
                out[alias] = (method.config_cls, dict(overrides))
    return out


def resolve_method(name: str) -> tuple[str, type[PeftConfig], dict[str, Any]]:
    """(canonical name, config class, default overrides) of a method name; PeftkitError if unknown."""
    names = method_names()
    key = str(name).strip().lower().replace("_", "-")
    if key not in names:
        hint = closest(key, names)
        raise ConfigError(
            f"Unknown method {name!r}. Methods in this peftkit: {', '.join(sorted(names))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "") + "."
        )
    cls, overrides = names[key]
    return key, cls, overrides


def method_fields(cls: type[PeftConfig]) -> list[dataclasses.Field]:
    """The fields of a method config a user sets (the PeftConfig base fields excluded)."""
    return [f for f in dataclasses.fields(cls) if f.name not in BASE_FIELDS and not f.name.startswith("_")]


def check_method_args(method: str, method_args: dict[str, Any]) -> None:
    """ConfigError naming unknown fields (and the closest known ones), before anything is loaded."""
    _, cls, _ = resolve_method(method)
    known = {f.name for f in method_fields(cls)}
    unknown = sorted(set(method_args) - known)
    if unknown:
        hints = [h for u in unknown for h in closest(u, known)[:1]]
        raise ConfigError(
            f"{cls.__name__} has no field(s) {unknown}" + (f" (did you mean {hints}?)" if hints else "")
            + f"; its fields: {', '.join(sorted(known))}."
        )


def build_peft_config(method: str, method_args: dict[str, Any], task_type: Optional[str],
                      model_path: Optional[str] = None) -> PeftConfig:
    """The method's config from its name and the user's fields (validated by the config class)."""
    check_method_args(method, method_args)
    _, cls, overrides = resolve_method(method)
    args = dict(overrides)
    args.update(method_args)
    # prompt-initialisation from text needs a tokenizer: default to the model's own
    fields = {f.name for f in dataclasses.fields(cls)}
    if "tokenizer_name_or_path" in fields and args.get("tokenizer_name_or_path") is None and model_path:
        args["tokenizer_name_or_path"] = model_path
    try:
        return cls(task_type=task_type, **args)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# models


def default_model_path() -> str:
    from ..assets import model_path

    return str(model_path())


def is_encoder_decoder(model_path: str, trust_remote_code: bool = False) -> bool:
    cfg = load_hf_config(model_path, trust_remote_code)
    return bool(getattr(cfg, "is_encoder_decoder", False))


def load_hf_config(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    if not os.path.isdir(model_path) and os.path.exists(model_path):
        raise PeftkitError(f"--model {model_path} is a file; pass a Hugging Face model folder or a Hub id.")
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        where = "folder" if os.path.isdir(model_path) else "Hub id or folder"
        raise PeftkitError(f"Could not load the model config from {where} {model_path!r}: {exc}") from None


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PeftkitError(f"Could not load a tokenizer from {model_path!r}: {exc}") from None
    if tok.pad_token is None:
        # a pad token is needed to batch; padded positions are masked out of attention and loss
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def quant_options(model_args: Any) -> Optional[dict[str, Any]]:
    """``load_quantized`` options from a run's model settings (a ModelArgs or its dict), or None."""
    get = model_args.get if isinstance(model_args, dict) else lambda k, d=None: getattr(model_args, k, d)
    bits = get("quantize")
    if bits is None:
        return None
    return {"bits": int(bits), "block_size": int(get("quant_block_size", 64) or 64),
            "double_quant": bool(get("double_quant", False)), "skip_modules": list(get("quant_skip_modules") or [])}


def load_model(model_path: str, task_type: str, *, num_labels: Optional[int] = None,
               id2label: Optional[dict[int, str]] = None, dtype: str = "float32",
               trust_remote_code: bool = False, pad_token_id: Optional[int] = None,
               quantize: Optional[dict[str, Any]] = None) -> Any:
    """A transformers model for ``task_type`` (a new classification head when the model has none).

    ``quantize`` (options of :func:`peftkit.load_quantized`: bits, block_size, double_quant,
    skip_modules) loads the base quantized layer by layer and freezes it for k-bit training.
    """
    import torch

    auto = auto_class_for(task_type)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, _DTYPES[dtype]), "trust_remote_code": trust_remote_code}
    if task_type == "SEQ_CLS":
        cfg = load_hf_config(model_path, trust_remote_code)
        has_head = any(str(a).endswith("ForSequenceClassification") for a in (getattr(cfg, "architectures", None) or []))
        if has_head and num_labels is not None and cfg.num_labels != num_labels:
            raise PeftkitError(
                f"{model_path} is a classifier with {cfg.num_labels} labels but the data has {num_labels}; "
                "use a base model (a new head is created) or data with the model's labels."
            )
        if not has_head and num_labels is not None:
            kwargs["num_labels"] = num_labels
            if id2label:
                kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
                kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    if quantize is not None:
        model = _load_quantized(model_path, auto, kwargs, quantize)
    elif _needs_structured_loader(model_path):
        from ..prune import load_structured

        model = load_structured(model_path).to(kwargs["dtype"])  # heads / channels removed (peftkit prune)
    else:
        try:
            model = auto.from_pretrained(model_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise PeftkitError(f"Could not load {model_path!r} as a {task_type} model: {exc}") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def _needs_structured_loader(model_path: str) -> bool:
    """A ``peftkit prune --heads/--channels`` folder whose config cannot state the new shapes (plain
    ``from_pretrained`` would refuse it): loaded as the class it was saved as."""
    import json

    path = os.path.join(model_path, "structure.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return not record.get("config_describes_model", True)


def _load_quantized(model_path: str, auto: Any, kwargs: dict[str, Any], options: dict[str, Any]) -> Any:
    from ..quant import load_quantized, prepare_model_for_kbit_training

    if not os.path.isdir(model_path):
        raise PeftkitError(f"--quantize loads a local model folder layer by layer; {model_path!r} is not one (download "
                           "it first, e.g. with huggingface-cli download, and pass the folder).")
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype")
    try:
        model = load_quantized(model_path, model_class=auto, dtype=dtype, **options, **kwargs)
    except PeftkitError as exc:
        hint = (" Choose a --quant-block-size that divides every quantized layer's in-features, or keep such layers "
                "in full precision with --quant-skip-modules." if "block" in str(exc) else "")
        raise type(exc)(f"{exc}{hint}") from None
    except (OSError, ValueError) as exc:
        raise PeftkitError(f"Could not load {model_path!r} quantized: {exc}") from None
    # freeze, float32 norms/embeddings; gradient checkpointing is the Trainer's own setting
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def task_for(format: str, model_path: str, trust_remote_code: bool = False) -> str:
    if format == "classification":
        return str(TaskType.SEQ_CLS)
    if is_encoder_decoder(model_path, trust_remote_code):
        return str(TaskType.SEQ_2_SEQ_LM)
    return str(TaskType.CAUSAL_LM)


__all__ = [
    "build_peft_config",
    "default_model_path",
    "load_model",
    "quant_options",
    "load_tokenizer",
    "method_fields",
    "method_names",
    "resolve_method",
    "task_for",
]
