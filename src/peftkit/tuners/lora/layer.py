"""Hugging Face PEFT's ``peft.tuners.lora.layer`` import path."""

from ...methods.lora import ConvNd, Embedding, Linear, LoraLayer

Conv1d = Conv2d = Conv3d = ConvNd

__all__ = ["Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraLayer"]
