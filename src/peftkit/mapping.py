"""Hugging Face PEFT's ``peft.mapping`` import path: peft_type -> config class / tuner class / tensor
prefix, built from the registry of the methods peftkit implements (methods registered later are in
:func:`peftkit.registry.all_methods`, not in these snapshots)."""

from typing import Any

from .config import PeftConfig
from .model import MODEL_TYPE_TO_PEFT_MODEL, inject_adapter_in_model
from .registry import all_methods

PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type] = {str(m.peft_type): m.config_cls for m in all_methods().values()}
PEFT_TYPE_TO_TUNER_MAPPING: dict[str, type] = {str(m.peft_type): m.tuner_cls for m in all_methods().values() if m.tuner_cls}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[str, str] = {k: v.prefix for k, v in PEFT_TYPE_TO_TUNER_MAPPING.items()}
MODEL_TYPE_TO_PEFT_MODEL_MAPPING = MODEL_TYPE_TO_PEFT_MODEL


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config of ``config_dict`` (its ``peft_type`` picks the class), as ``PeftConfig.from_dict``."""
    return PeftConfig.from_dict(config_dict)


__all__ = ["MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING",
           "PEFT_TYPE_TO_TUNER_MAPPING", "get_peft_config", "inject_adapter_in_model"]
