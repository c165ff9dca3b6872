"""Hugging Face PEFT's ``peft.tuners.ia3`` import path (re-exports of :mod:`peftkit.methods.ia3`)."""

from ...methods.ia3 import ConvNd, IA3Config, IA3Layer, IA3Model, Linear

Conv1d = Conv2d = Conv3d = ConvNd

__all__ = ["Conv1d", "Conv2d", "Conv3d", "IA3Config", "IA3Layer", "IA3Model", "Linear"]
