"""Hugging Face PEFT's ``peft.tuners.tuners_utils`` import path: ``BaseTuner`` (peftkit's
:class:`~peftkit.tuner.BaseTuner`), ``BaseTunerLayer`` (the adapter-layer protocol,
:class:`~peftkit.core.layer.AdapterLayer`: ``isinstance(module, BaseTunerLayer)`` finds every adapter
layer), ``check_target_module_exists``."""

from ...core.layer import AdapterLayer
from ...core.targets import check_target_module_exists
from ...tuner import BaseTuner

BaseTunerLayer = AdapterLayer

__all__ = ["BaseTuner", "BaseTunerLayer", "check_target_module_exists"]
