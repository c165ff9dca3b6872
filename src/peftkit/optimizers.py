"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): the ``B`` factors
learn ``loraplus_lr_ratio`` times faster than the ``A`` factors, which the paper shows is what makes
LoRA's feature learning efficient at width. Hugging Face PEFT's ``create_loraplus_optimizer``.

The optimizer gets four parameter groups, always in this order (empty ones stay, so indices are
stable)::

    0  A factors and the other trainable tensors      lr                       weight_decay
    1  LoRA tensors of embedding layers               loraplus_lr_embedding    weight_decay
    2  B factors, 1-d tensors that decay (DoRA's m)   lr * loraplus_lr_ratio   weight_decay
    3  biases and normalisation weights               lr * loraplus_lr_ratio   0

``weight_decay`` is ``loraplus_weight_decay`` (default 0); every other keyword goes to ``optimizer_cls``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that never decay: biases and the weights of normalisation layers (any class whose
    name ends in ``Norm``, e.g. transformers' ``LlamaRMSNorm``)."""
    out = set()
    for key, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")
        for name, _ in module.named_parameters(recurse=False):
            if is_norm or name.endswith("bias"):
                out.add(f"{key}.{name}" if key else name)
    return out


def _check(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"create_loraplus_optimizer: {name} must be a positive number, got {value!r}.")
    return float(value)


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s groups (module doc).

    Args:
        model: a PeftModel, or any module with LoRA layers (or none: then every trainable tensor is in
            group 0 or 3).
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: the learning rate of the A factors (ηA).
        loraplus_lr_ratio: ηB / ηA (the paper uses about 16; ≥ 1).
        loraplus_lr_embedding: learning rate of LoRA tensors on embedding layers (default 1e-6).
        loraplus_weight_decay: weight decay of the decaying groups (default 0).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"create_loraplus_optimizer: model must be an nn.Module, got {type(model).__name__}.")
    lr = _check("lr", lr)
    ratio = _check("loraplus_lr_ratio", loraplus_lr_ratio)
    embedding_lr = _check("loraplus_lr_embedding", kwargs.pop("loraplus_lr_embedding", 1e-6))
    decay = float(kwargs.pop("loraplus_weight_decay", 0.0))
    embedding_params = {id(p) for m in model.modules() for attr in ("lora_embedding_A", "lora_embedding_B")
                        if isinstance(getattr(m, attr, None), nn.ParameterDict) for p in getattr(m, attr).parameters()}
    no_decay = _no_decay_names(model)
    groups: list[list[nn.Parameter]] = [[], [], [], []]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            groups[1].append(p)
        elif ".lora_B." in f".{name}" or p.ndim == 1:
            groups[3 if name in no_decay else 2].append(p)
        else:
            groups[0].append(p)
    kwargs["lr"] = lr
    return optimizer_cls([
        {"params": groups[0], "weight_decay": decay, "lr": lr},
        {"params": groups[1], "weight_decay": decay, "lr": embedding_lr},
        {"params": groups[2], "weight_decay": decay, "lr": lr * ratio},
        {"params": groups[3], "weight_decay": 0.0, "lr": lr * ratio},
    ], **kwargs)


__all__ = ["create_loraplus_optimizer"]
