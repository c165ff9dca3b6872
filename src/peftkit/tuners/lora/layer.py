"""Hugging Face PEFT's ``peft.tuners.lora.layer`` import path."""

from ...methods.lora import ConvNd, Embedding, Linear, LoraLayer, MultiheadAttention, ParamWrapper

Conv1d = Conv2d = Conv3d = ConvNd

__all__ = ["Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraLayer", "MultiheadAttention", "ParamWrapper"]
