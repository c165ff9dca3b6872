"""Which LoRA layer wraps a target: dispatch by module type."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ...core.dispatch import CONV_TYPES, linear_fan_in_fan_out, wrapped_module
from ...errors import PeftkitWarning, TargetError
from .config import LoraConfig
from .conv import ConvNd
from .embedding import Embedding
from .layer import LoraLayer
from .linear import Linear
from .mha import make_mha_layer


def make_layer(target: nn.Module, config: LoraConfig, adapter_name: str, key: str) -> LoraLayer:
    """The LoRA layer for ``target`` holding adapter ``adapter_name``; TargetError for other module types.
    ``target`` may be another method's adapter layer: the new layer wraps it (its type is the module inside)."""
    kind = wrapped_module(target)
    if isinstance(kind, nn.MultiheadAttention):
        if kind is not target:
            raise TargetError(f"{key}: LoRA on an nn.MultiheadAttention cannot wrap another method's adapter layer.")
        return make_mha_layer(target, config, adapter_name, key)  # also adapts its out_proj
    if isinstance(kind, nn.Embedding):
        layer: LoraLayer = Embedding(target)
    elif isinstance(kind, CONV_TYPES):
        layer = ConvNd(target)
    else:
        fan_in_fan_out = linear_fan_in_fan_out(kind, config.fan_in_fan_out)
        if fan_in_fan_out is None:
            raise TargetError(
                f"Target module {key} ({type(kind).__name__}) is not supported by LoRA. Supported: nn.Linear, "
                "nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention, transformers Conv1D and peftkit quantized "
                "linears; target its linear submodules instead."
            )
        if type(kind) is NonDynamicallyQuantizableLinear:
            warnings.warn(f"{key} is the out_proj of an nn.MultiheadAttention, which reads its weight but never calls "
                          "it: a LoRA adapter on it alone has no effect. Target the MultiheadAttention module "
                          "(its LoRA layer adapts in_proj and out_proj).", PeftkitWarning, stacklevel=4)
        layer = Linear(target, fan_in_fan_out=fan_in_fan_out)
    layer.update_layer(adapter_name, config, key)
    return layer


__all__ = ["make_layer"]
