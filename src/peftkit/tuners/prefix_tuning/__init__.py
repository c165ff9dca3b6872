"""Hugging Face PEFT's ``peft.tuners.prefix_tuning`` import path."""

from ...methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
