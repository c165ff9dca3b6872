"""The model under training: unwrapping DDP, telling a PeftModel apart, and saving or loading its
trainable weights (a PeftModel's adapter folder; for any other model, its trainable tensors)."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from .._io import load_tensors, save_tensors
from ..checkpoint import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from ..errors import CheckpointError
from ..model import PeftModel


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(unwrap(model), PeftModel)


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` in training mode (or eval mode) inside, in its own mode again after, also on errors."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def is_prompt_learning(model: nn.Module) -> bool:
    m = unwrap(model)
    return is_peft_model(m) and bool(getattr(m.active_peft_config, "is_prompt_learning", False))


def save_trainable(model: nn.Module, folder: str) -> None:
    """A PeftModel's adapter folder; for another model, its trainable tensors as safetensors."""
    m = unwrap(model)
    if is_peft_model(m):
        m.save_pretrained(folder)
        return
    os.makedirs(folder, exist_ok=True)
    save_tensors({n: p for n, p in m.named_parameters() if p.requires_grad}, os.path.join(folder, "trainable.safetensors"))


def _adapter_folder(m: nn.Module, folder: str) -> tuple[str, str]:
    name = m.active_adapters[0]
    return name, (folder if name == "default" else os.path.join(folder, name))


def expected_trainable(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor :func:`save_trainable` writes for ``model``."""
    m = unwrap(model)
    if is_peft_model(m):
        with warnings.catch_warnings():  # "auto" embedding saving says so once, when saving
            warnings.simplefilter("ignore")
            tensors = get_peft_model_state_dict(m, adapter_name=m.active_adapters[0])
        return {k: tuple(v.shape) for k, v in tensors.items()}
    return {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}


def read_trainable(model: nn.Module, folder: str) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_trainable` wrote into ``folder`` (CheckpointError if unreadable)."""
    m = unwrap(model)
    if is_peft_model(m):
        return load_peft_weights(_adapter_folder(m, folder)[1])
    return load_tensors(os.path.join(folder, "trainable.safetensors"))


def load_trainable(model: nn.Module, folder: str, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Load what :func:`save_trainable` wrote (or its ``tensors``, already read) into ``model``;
    every tensor is checked before any is copied."""
    m = unwrap(model)
    tensors = read_trainable(m, folder) if tensors is None else tensors
    if is_peft_model(m):
        name, sub = _adapter_folder(m, folder)
        set_peft_model_state_dict(m, tensors, name, source=sub)
        return
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    bad = sorted(k for k in tensors if k not in params or tensors[k].shape != params[k].shape)
    missing = sorted(set(params) - set(tensors))
    if bad or missing:
        raise CheckpointError(f"{folder} does not match the model's trainable parameters ("
                              + (f"{bad[0]!r} unknown or of another shape" if bad else f"{missing[0]!r} missing") + ").")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


__all__ = ["expected_trainable", "in_mode", "is_peft_model", "is_prompt_learning", "load_trainable", "read_trainable",
           "save_trainable", "unwrap"]
