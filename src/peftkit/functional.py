"""Hugging Face PEFT's ``peft.functional``: adapters on a model with no :class:`~peftkit.PeftModel`
around it (what transformers' ``PreTrainedModel.load_adapter`` / ``delete_adapter`` and diffusers call).

Every function works on the adapter layers found in ``model``: the ``BaseTunerLayer`` instances and the
``modules_to_save`` copies (``ModulesToSaveWrapper``, no ``BaseTunerLayer`` as in PEFT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .checkpoint import get_peft_model_state_dict, set_peft_model_state_dict
from .core.inject import adapter_layers, remove_adapter
from .core.layer import AdapterLayer
from .core.modules_to_save import ModulesToSaveWrapper
from .errors import AdapterNameError
from .model import inject_adapter_in_model


def _layers(model: nn.Module, layer_cls: type = AdapterLayer) -> list[AdapterLayer]:
    return [layer for _, layer in adapter_layers(model) if isinstance(layer, layer_cls)]


def _names(adapter_names: str | Sequence[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _check_known(model: nn.Module, names: list[str], what: str) -> None:
    known = {n for layer in _layers(model) for n in layer.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterNameError(f"{what}: adapter {unknown[0]!r} is not in this model; its adapters: {sorted(known)}.")


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str], inference_mode: bool = False,
                layer_cls: type = AdapterLayer) -> None:
    """Make ``adapter_name`` (one name or several) the active adapter(s) of every adapter layer; their
    tensors train unless ``inference_mode``, every other adapter's tensors are frozen."""
    names = _names(adapter_name)
    _check_known(model, names, "set_adapter")
    for layer in _layers(model, layer_cls):
        layer.set_adapter(names, trainable=not inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str, prefix: Optional[str] = None,
                   layer_cls: type = AdapterLayer) -> Optional[list[str]]:
    """Remove adapter ``adapter_name``'s tensors from every layer (a layer left with no adapter gives its
    place back to the module it wraps). Returns the adapters still active afterwards, or None.
    ``prefix`` and ``layer_cls`` are accepted for Hugging Face PEFT's signature; peftkit finds the
    layers itself. ``model.peft_config``, if any, is left to the caller, as in PEFT. An adapter the model
    does not hold is nothing to delete, as in PEFT: transformers' ``delete_adapter(["a", "a"])`` deletes
    it once, then asks again."""
    if any(adapter_name in layer.adapter_names for layer in _layers(model)):
        remove_adapter(model, adapter_name)
    remaining = [layer for layer in _layers(model, layer_cls) if not isinstance(layer, ModulesToSaveWrapper)]
    active = list(dict.fromkeys(n for layer in remaining for n in layer.active_adapters))
    if not active:
        leftover = list(dict.fromkeys(n for layer in remaining for n in layer.adapter_names))
        if leftover:  # the deleted adapter was the active one: the next one left becomes active, as in PEFT
            for layer in _layers(model, layer_cls):
                layer.set_adapter(leftover[:1])
            active = leftover[:1]
    return active or None


def set_requires_grad(model: nn.Module, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
    """Turn training of the given adapters' tensors on or off, on every adapter layer of ``model``."""
    names = _names(adapter_names)
    _check_known(model, names, "set_requires_grad")
    for layer in _layers(model):
        for name in names:
            for _, tensor in layer.adapter_param_items(name):
                tensor.requires_grad_(requires_grad)


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Cast adapter ``adapter_name``'s float16 / bfloat16 tensors to float32 (PEFT's
    ``autocast_adapter_dtype``); does nothing when ``autocast_adapter_dtype`` is False. Copies of whole
    base modules (``modules_to_save``) keep their dtype."""
    if not autocast_adapter_dtype:
        return
    for layer in _layers(model):
        if isinstance(layer, ModulesToSaveWrapper):
            continue
        for _, tensor in layer.adapter_param_items(adapter_name):
            if tensor.dtype in (torch.float16, torch.bfloat16):
                tensor.data = tensor.data.float()


__all__ = ["cast_adapter_dtype", "delete_adapter", "get_peft_model_state_dict", "inject_adapter_in_model", "set_adapter",
           "set_peft_model_state_dict", "set_requires_grad"]
