"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train copies of the norm layers.

Each targeted normalization module ``N`` (LayerNorm, RMSNorm, T5LayerNorm, ...) keeps its frozen
original as ``base_layer`` and gets one trainable deep copy per adapter, ``ln_tuning_layers[a]``::

    y = N_a(x)          (N_a: the copy of adapter a, initially equal to N: a no-op start)

for the single active adapter (a copy replaces the module; several active adapters are refused).
Merging copies the tuned tensors into ``N`` (the originals are kept for an exact unmerge); one adapter
at a time. A mixed batch runs each distinct adapter's copy on its rows (see :class:`CopyLayer`).

Config and file format as Hugging Face PEFT: ``LNTuningConfig(target_modules, exclude_modules,
modules_to_save)`` with HF's default targets per model type, file keys ``<norm>.ln_tuning_layers.weight``
(and ``.bias``). For model types without a default (and plain modules), peftkit targets every
normalization layer of the model (by module type) and writes those names into the saved config, so
Hugging Face PEFT loads the folder too. Copies keep the base dtype (no fp32 autocast, as HF).
"""

from __future__ import annotations

from torch import nn

from ...core.copy_layer import CopyLayer
from .config import LNTuningConfig


class LNTuningLayer(CopyLayer):
    """LayerNorm tuning of one norm module: ``y = N_a(x)`` with ``N_a`` the active adapter's copy."""

    adapter_layer_names = ("ln_tuning_layers",)
    method_name = "LayerNorm-tuning"


def make_layer(target: nn.Module, config: LNTuningConfig, adapter_name: str, key: str) -> LNTuningLayer:
    """The LNTuningLayer around ``target`` (which must have parameters)."""
    return LNTuningLayer.wrap(target, config, adapter_name, key)


__all__ = ["LNTuningLayer", "make_layer"]
