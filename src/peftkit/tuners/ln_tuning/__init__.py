"""Hugging Face PEFT's ``peft.tuners.ln_tuning`` import path."""

from ...methods.ln_tuning import LNTuningConfig, LNTuningLayer, LNTuningModel

__all__ = ["LNTuningConfig", "LNTuningLayer", "LNTuningModel"]
