"""Partial fine-tuning: train whole blocks (the last N transformer blocks) or named modules.

:class:`PartialLayer` wraps a block (the last ``num_last_layers`` transformer blocks, and/or modules
named by ``target_modules``) and holds one trainable deep copy per adapter (``partial_layers[a]``);
the forward runs the active adapter's copy (see :class:`~peftkit.core.copy_layer.CopyLayer`). File
keys are the model's own keys of the copied tensors (``base_model.model.model.layers.1.mlp.down_proj.weight``),
so a saved adapter is a subset of a full state dict. Only parameters are saved (not buffers such as
BatchNorm running statistics). Merging copies the tuned tensors into the original block (kept for an
exact unmerge); one adapter at a time, since copies replace rather than add.
"""

from __future__ import annotations

from torch import nn

from ...core.copy_layer import CopyLayer
from .config import PartialConfig


class PartialLayer(CopyLayer):
    """Partial fine-tuning of one block or module: ``y = copy_a(x, ...)`` for the active adapter ``a``."""

    strip_copy_prefix = True
    method_name = "partial fine-tuning"
    adapter_layer_names = ("partial_layers",)


def make_partial_layer(target: nn.Module, config: PartialConfig, adapter_name: str, key: str) -> PartialLayer:
    """The PartialLayer around ``target`` (which must have parameters)."""
    return PartialLayer.wrap(target, config, adapter_name, key)


__all__ = ["PartialLayer", "make_partial_layer"]
