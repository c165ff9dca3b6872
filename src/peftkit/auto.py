"""AutoPeftModel*: load an adapter folder together with its base model, and the task -> transformers
Auto class map the toolkit uses (:func:`auto_class_for`)."""

from __future__ import annotations

import os
from typing import Any, Optional

from .config import PeftConfig
from .errors import PeftkitError
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

class AutoPeftModel:
    """Load an adapter folder together with its base model (from ``base_model_name_or_path``)."""

    _target_class: Optional[str] = None  # transformers Auto class name
    _peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise PeftkitError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(...).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, **kwargs: Any) -> PeftModel:
        import transformers

        hub_keys = ("cache_dir", "token", "local_files_only", "subfolder")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in hub_keys}
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise PeftkitError(
                f"{pretrained_model_name_or_path}: adapter_config.json has no base_model_name_or_path; load the base "
                "model yourself and use PeftModel.from_pretrained(model, path)."
            )
        target = cls._target_class
        task = str(peft_config.task_type) if peft_config.task_type else None
        if target is None:
            target = _TASK_TO_AUTO.get(task, "AutoModel") if task else None
            if target is None:
                target = _mapped_class(peft_config.auto_mapping)
        elif task is not None and _TASK_TO_AUTO.get(task) not in (None, target):
            raise PeftkitError(f"The adapter's task_type is {task}; load it with the matching AutoPeftModel class "
                               f"(it needs {_TASK_TO_AUTO[task]}, not {target}).")
        auto_cls = getattr(transformers, target, None)
        if not isinstance(auto_cls, type) or not hasattr(auto_cls, "from_pretrained"):
            raise PeftkitError(f"{pretrained_model_name_or_path}: adapter_config.json names the base model class "
                               f"{target!r}, which transformers {transformers.__version__} does not have; load the base "
                               "model yourself and use PeftModel.from_pretrained(model, path).")
        try:
            base = auto_cls.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        except OSError as exc:
            raise PeftkitError(f"Could not load the base model {base_path!r}: {exc}") from None
        return cls._peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                               is_trainable=is_trainable, config=peft_config, revision=revision,
                                               **hub_kwargs)


def _mapped_class(mapping: Any) -> str:
    """The transformers class named by an adapter's ``auto_mapping`` (adapters without a task type)."""
    mapping = mapping if isinstance(mapping, dict) else {}
    base_cls_name, parent = mapping.get("base_model_class"), mapping.get("parent_library")
    if not isinstance(base_cls_name, str) or not isinstance(parent, str) or not parent.startswith("transformers"):
        raise PeftkitError("The adapter has no task_type and no transformers base class to load; load the base model "
                           "yourself and use PeftModel.from_pretrained.")
    return base_cls_name


_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def auto_class_for(task_type: Any, default: str = "CAUSAL_LM") -> Any:
    """The transformers Auto class that builds a model for ``task_type`` (``default``'s when the
    task is None or has no Auto class)."""
    import transformers

    name = _TASK_TO_AUTO.get(str(task_type)) if task_type is not None else None
    return getattr(transformers, name or _TASK_TO_AUTO[default])


class AutoPeftModelForCausalLM(AutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _target_class = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction


__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "auto_class_for",
]
