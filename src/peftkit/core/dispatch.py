"""Dispatch by module type: which kind of linear or convolution a target is, shared by the methods
that wrap them (LoRA, IA3, bottleneck adapters).

transformers' GPT-2-style ``Conv1D`` is a linear map whose weight is stored transposed, (in, out);
layers handle it with ``fan_in_fan_out=True``. Quantized linears (peftkit's, bitsandbytes') mark
themselves with ``is_quantized_linear`` or are recognised by :mod:`peftkit.quant`.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from ..errors import PeftkitWarning

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def wrapped_module(target: nn.Module) -> nn.Module:
    """The module whose type decides how ``target`` is adapted: the plain module inside when ``target`` is
    another method's adapter layer (methods stack: the new layer wraps the old one), else ``target``."""
    get_base = getattr(target, "get_base_layer", None)
    return get_base() if callable(get_base) else target


def is_conv1d_transposed(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2's linear layer, weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a quantized linear layer (weight (out, in))."""
    return isinstance(module, nn.Linear) or bool(getattr(module, "is_quantized_linear", False))


def linear_fan_in_fan_out(target: nn.Module, requested: bool) -> Optional[bool]:
    """The ``fan_in_fan_out`` to use for a linear-like ``target``, or None if it is not one.

    transformers ``Conv1D``: True (a warning when the config asked for False); ``nn.Linear`` and
    quantized linears: False (a warning when the config asked for True)."""
    if is_conv1d_transposed(target):
        if not requested:
            warnings.warn("transformers Conv1D layers store their weight as (in, out); using fan_in_fan_out=True for "
                          "them.", PeftkitWarning, stacklevel=5)
        return True
    if is_linear(target):
        if requested:
            warnings.warn("fan_in_fan_out=True is ignored for nn.Linear layers (their weight is (out, in)).",
                          PeftkitWarning, stacklevel=5)
        return False
    return None


def linear_in_out(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of a linear-like module (Conv1D included), else None."""
    if is_linear(module):
        return module.in_features, module.out_features
    if is_conv1d_transposed(module):
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


__all__ = ["CONV_TYPES", "is_conv1d_transposed", "is_linear", "linear_fan_in_fan_out", "linear_in_out",
           "wrapped_module"]
