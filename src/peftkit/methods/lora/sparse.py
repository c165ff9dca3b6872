"""Sparsity-preserving LoRA over a pruned base: :func:`keep_sparsity` puts the pruning masks on the LoRA
layers, so that every adapter's ``ΔW`` is ``(s B A) ⊙ M`` (:meth:`.linear.Linear.set_delta_mask`).

Trained this way, ``merge_and_unload`` (and ``peftkit merge --keep-sparsity``) gives ``W + (s B A) ⊙ M``: exactly
what the model computed, with every pruned zero still zero. Other methods need nothing: IA3 scales columns
(zeros stay zeros), bottleneck adapters and soft prompts are never merged into ``W``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from ...checkpoint import strip_wrappers
from ...errors import ConfigError
from .layer import LoraLayer
from .linear import Linear

_PEFT_PREFIXES = ("base_model.model.", "base_model.")


def _base_name(key: str) -> str:
    key = strip_wrappers(key + ".")[:-1]
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def keep_sparsity(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]]) -> list[str]:
    """Mask the ``ΔW`` of every LoRA linear layer of ``model`` (a PeftModel, or a model with injected
    adapters) whose base module has a mask in ``masks`` (``{base module name: bool mask}``, as
    ``peftkit.prune`` returns and saves them; names as in the base model, e.g.
    ``model.layers.0.mlp.down_proj``). ``None`` removes every mask. Returns the masked layers' names.

    All masks are checked (a LoRA layer of another type under a mask, a shape that does not fit) before
    any is set. Masks for modules without a LoRA layer are ignored: nothing changes there.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if masks is None:
        for _, layer in layers:
            if isinstance(layer, Linear):
                layer.set_delta_mask(None)
        return []
    plan = []
    for name, layer in layers:
        mask = masks.get(_base_name(name))
        if mask is None:
            continue
        if not isinstance(layer, Linear):
            raise ConfigError(f"{name}: sparsity-preserving LoRA covers linear layers; this is a "
                              f"{type(layer).__name__}.")
        weight = layer.get_base_layer().weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(f"{name}: the sparsity mask has shape {tuple(mask.shape)}, the base weight "
                              f"{tuple(weight.shape)}: the masks are not this model's.")
        if any(layer.use_dora.values()):
            raise ConfigError(f"{name}: sparsity-preserving LoRA does not support DoRA adapters.")
        plan.append((name, layer, mask))
    for _, layer, mask in plan:
        layer.set_delta_mask(mask)
    return [name for name, _, _ in plan]


__all__ = ["keep_sparsity"]
