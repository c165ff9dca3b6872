"""The model under training: unwrapping DDP, telling a PeftModel apart, and saving or loading its
trainable weights (a PeftModel's adapter folder; for any other model, its trainable tensors)."""

from __future__ import annotations

import os

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_peft_model(model: nn.Module) -> bool:
    from ..model import PeftModel

    return isinstance(unwrap(model), PeftModel)


def is_prompt_learning(model: nn.Module) -> bool:
    m = unwrap(model)
    return is_peft_model(m) and bool(getattr(m.active_peft_config, "is_prompt_learning", False))


def save_trainable(model: nn.Module, folder: str) -> None:
    """A PeftModel's adapter folder; for another model, its trainable tensors as safetensors."""
    m = unwrap(model)
    if is_peft_model(m):
        m.save_pretrained(folder)
        return
    from .._io import save_tensors

    os.makedirs(folder, exist_ok=True)
    save_tensors({n: p for n, p in m.named_parameters() if p.requires_grad}, os.path.join(folder, "trainable.safetensors"))


def load_trainable(model: nn.Module, folder: str) -> None:
    m = unwrap(model)
    if is_peft_model(m):
        from ..checkpoint import load_peft_weights, set_peft_model_state_dict

        name = m.active_adapters[0]
        sub = folder if name == "default" else os.path.join(folder, name)
        set_peft_model_state_dict(m, load_peft_weights(sub), name, source=sub)
        return
    from .._io import load_tensors

    tensors = load_tensors(os.path.join(folder, "trainable.safetensors"))
    params = dict(m.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


__all__ = ["is_peft_model", "is_prompt_learning", "load_trainable", "save_trainable", "unwrap"]
