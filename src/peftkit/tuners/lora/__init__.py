"""Hugging Face PEFT's ``peft.tuners.lora`` import path (re-exports of :mod:`peftkit.methods.lora`).

peftkit has one convolution class for 1-d, 2-d and 3-d kernels: ``Conv1d``, ``Conv2d`` and ``Conv3d``
all name it (docs/compat.md)."""

from ...methods.lora import (
    ConvNd,
    Embedding,
    Linear,
    LoraConfig,
    LoraLayer,
    LoraModel,
    MultiheadAttention,
    ParamWrapper,
)

Conv1d = Conv2d = Conv3d = ConvNd

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvNd", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel",
           "MultiheadAttention", "ParamWrapper"]
