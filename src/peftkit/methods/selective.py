"""Compatibility module: BitFit and partial fine-tuning are now the folders ``bitfit`` and ``partial``;
their shared "one trainable copy per adapter" layer is :class:`peftkit.core.copy_layer.CopyLayer`."""

from ..core.copy_layer import CopyLayer
from .bitfit import BitFitConfig, BitFitLayer, find_bias_targets
from .partial import PartialConfig, PartialLayer, block_lists, find_partial_targets

__all__ = ["BitFitConfig", "BitFitLayer", "CopyLayer", "PartialConfig", "PartialLayer", "block_lists",
           "find_bias_targets", "find_partial_targets"]
