"""The base model's own state dict, read from and written into a model with adapters (Hugging Face
PEFT's ``get_base_model_state_dict`` / ``set_base_model_state_dict``).

Adapter layers rename what they wrap (``q_proj.weight`` is ``q_proj.base_layer.weight`` inside a LoRA
layer, a ``modules_to_save`` head's weight is ``score.original_module.weight``) and add tensors of their
own. These functions speak the original names: adapter tensors are left out, wrapper segments are
dropped on the way out and put back on the way in, e.g. to load base weights after FSDP wrapping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import IncompatibleKeys, check_state_dict
from .errors import CheckpointError
from .core.inject import adapter_layers

WRAPPED_SEGMENTS = (".base_layer.", ".original_module.")


def _root(model: nn.Module) -> nn.Module:
    """The module holding the base weights: a PeftModel's base model, else ``model``."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def _adapter_prefixes(root: nn.Module) -> tuple[str, ...]:
    """Key prefixes of every adapter's own tensors (LoRA's ``lora_A.``, a modules_to_save copy, ...)."""
    out = []
    for key, layer in adapter_layers(root):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            if isinstance(getattr(layer, attr, None), nn.Module):
                out.append(f"{key}.{attr}." if key else f"{attr}.")
    return tuple(out)


def original_key(key: str) -> str:
    """``a.q_proj.base_layer.weight`` -> ``a.q_proj.weight`` (also nested wrappers and a wrapped root)."""
    key = "." + key
    for segment in WRAPPED_SEGMENTS:
        while segment in key:
            key = key.replace(segment, ".")
    return key[1:]


def _base_keys(root: nn.Module) -> dict[str, str]:
    """Original key -> key in the wrapped model, for every base tensor of ``root``."""
    prefixes = _adapter_prefixes(root)
    return {original_key(k): k for k in root.state_dict() if not k.startswith(prefixes)}


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names, adapter tensors left out."""
    state = _root(model).state_dict()
    return {orig: state[key] for orig, key in _base_keys(_root(model)).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
    """Load base-model tensors named as in the original model into ``model`` (adapters untouched).

    Returns the original keys the state dict lacked and its keys that name no base tensor; with
    ``strict`` either is a RuntimeError (as ``torch.nn.Module.load_state_dict``); a value that is not a
    tensor or has the wrong shape is a CheckpointError. In every case nothing is loaded."""
    check_state_dict(state_dict, "base model state dict")
    root = _root(model)
    names = _base_keys(root)
    current = root.state_dict()
    bad = [k for k, v in state_dict.items() if k in names and tuple(v.shape) != tuple(current[names[k]].shape)]
    if bad:
        raise CheckpointError(f"base model state dict: {bad[0]!r} has shape {tuple(state_dict[bad[0]].shape)} but the "
                              f"model's is {tuple(current[names[bad[0]]].shape)}. Nothing was loaded.")
    missing = [k for k in names if k not in state_dict]
    unexpected = [k for k in state_dict if k not in names]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading the base model state dict: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}.")
    root.load_state_dict({names[k]: v for k, v in state_dict.items() if k in names}, strict=False)
    return IncompatibleKeys(missing, unexpected)


__all__ = ["get_base_model_state_dict", "original_key", "set_base_model_state_dict"]
