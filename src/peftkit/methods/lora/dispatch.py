"""Which LoRA layer wraps a target: dispatch by module type."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ...core.dispatch import CONV_TYPES, linear_fan_in_fan_out
from ...errors import PeftkitWarning, TargetError
from .config import LoraConfig
from .conv import ConvNd
from .embedding import Embedding
from .layer import LoraLayer
from .linear import Linear
from .mha import make_mha_layer


def make_layer(target: nn.Module, config: LoraConfig, adapter_name: str, key: str) -> LoraLayer:
    """The LoRA layer for ``target`` holding adapter ``adapter_name``; TargetError for other module types."""
    if isinstance(target, nn.MultiheadAttention):
        return make_mha_layer(target, config, adapter_name, key)  # also adapts its out_proj
    if isinstance(target, nn.Embedding):
        layer: LoraLayer = Embedding(target)
    elif isinstance(target, CONV_TYPES):
        layer = ConvNd(target)
    else:
        fan_in_fan_out = linear_fan_in_fan_out(target, config.fan_in_fan_out)
        if fan_in_fan_out is None:
            raise TargetError(
                f"Target module {key} ({type(target).__name__}) is not supported by LoRA. Supported: nn.Linear, "
                "nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention, transformers Conv1D and peftkit quantized "
                "linears; target its linear submodules instead."
            )
        if type(target) is NonDynamicallyQuantizableLinear:
            warnings.warn(f"{key} is the out_proj of an nn.MultiheadAttention, which reads its weight but never calls "
                          "it: a LoRA adapter on it alone has no effect. Target the MultiheadAttention module "
                          "(its LoRA layer adapts in_proj and out_proj).", PeftkitWarning, stacklevel=4)
        layer = Linear(target, fan_in_fan_out=fan_in_fan_out)
    layer.update_layer(adapter_name, config, key)
    return layer


__all__ = ["make_layer"]
