"""The adapter status of a model, layer by layer and summed up (Hugging Face PEFT's ``get_layer_status``
and ``get_model_status``, same fields and the same ``"irregular"`` convention).

Works on a PeftModel of a layer method, or on any module with adapter layers injected
(:func:`peftkit.inject_adapter_in_model`). Soft-prompt models have no adapter layers: TypeError, as in
Hugging Face PEFT.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from .core.inject import adapter_layers
from .core.layer import AdapterLayer
from .errors import PeftkitError
from .quant import Int8Linear, NF4Linear

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer: its key, type (``lora.Linear``), whether it is enabled, its active, merged and
    available adapters, whether each adapter's tensors train (``"irregular"`` when only some do), the
    device types of each adapter's tensors, and the quantization backend of its base (or None)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None]


@dataclass
class TunerModelStatus:
    """The whole model: the layer statuses summed up; a field whose layers disagree is ``"irregular"``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _all_or_irregular(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _is_peft_model(model: nn.Module) -> bool:
    """A PeftModel (configs, a tuner and its base), not a transformers model with injected adapters (which
    has ``peft_config`` and transformers' own ``base_model`` too)."""
    return (isinstance(getattr(model, "peft_config", None), dict)
            and isinstance(getattr(model, "base_model", None), nn.Module)
            and callable(getattr(model, "get_base_model", None)))


def _adapted_root(model: nn.Module) -> nn.Module:
    """The module whose adapter layers are reported: a PeftModel's tuner, else ``model`` itself."""
    if not isinstance(model, nn.Module):
        raise PeftkitError(f"get_layer_status / get_model_status take a model (an nn.Module), got {type(model).__name__}.")
    if _is_peft_model(model):
        if any(getattr(c, "is_prompt_learning", False) for c in model.peft_config.values()):
            raise TypeError(f"{type(model).__name__} holds soft-prompt adapters, which have no adapter layers; "
                            "get_layer_status / get_model_status report layer methods (LoRA, IA3, ...).")
        return model.base_model
    return model


def _module_type(layer: nn.Module) -> str:
    """``lora.Linear`` for peftkit.methods.lora.linear.Linear (Hugging Face PEFT's spelling)."""
    parts = type(layer).__module__.split(".")
    if len(parts) > 2 and parts[1] == "methods":
        return f"{parts[2]}.{type(layer).__name__}"
    return type(layer).__name__


def _quantization_backend(base: nn.Module) -> Union[str, None]:
    """``"peftkit int8"`` / ``"peftkit nf4"`` for our quantized linears, ``"bnb 8bit"`` / ``"bnb 4bit"`` for
    bitsandbytes', else None."""
    if isinstance(base, Int8Linear):
        return "peftkit int8"
    if isinstance(base, NF4Linear):
        return "peftkit nf4"
    return {"Linear8bitLt": "bnb 8bit", "Linear4bit": "bnb 4bit"}.get(type(base).__name__)


def layer_status(key: str, layer: AdapterLayer) -> TunerLayerStatus:
    """The status of one adapter layer."""
    grads: dict[str, list[bool]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for name in layer.adapter_names:
        for _, tensor in layer.adapter_param_items(name):
            grads[name].append(tensor.requires_grad)
            devices[name].add(tensor.device.type)
    backend = _quantization_backend(layer.get_base_layer())
    return TunerLayerStatus(
        name=key, module_type=_module_type(layer), enabled=not layer.disabled,
        active_adapters=list(layer.active_adapters), merged_adapters=list(layer.merged_adapters),
        requires_grad={n: _all_or_irregular(v) for n, v in grads.items() if v},
        available_adapters=sorted(layer.adapter_names), devices={n: sorted(d) for n, d in devices.items()},
        quantization_backend=backend,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer of ``model`` (a PeftModel or a module with injected adapters)."""
    out = [layer_status(key, layer) for key, layer in adapter_layers(_adapted_root(model))]
    if not out:
        raise PeftkitError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                           "have PEFT adapters injected in the model.")
    return out


def _merged(layers: list[TunerLayerStatus]) -> Union[list[str], Irregular]:
    merged = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged:
            return "irregular"
    return sorted(merged)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit tensor counts its unpacked values."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapter status of ``model`` summed over its layers (see :class:`TunerModelStatus`)."""
    layers = get_layer_status(model)
    if _is_peft_model(model):
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {name: str(c.peft_type) for name, c in model.peft_config.items()}
    else:
        base_type = type(model).__name__ if hasattr(model, "config") and hasattr(model, "can_generate") else "other"
        adapter_type, peft_types = "None", {}
    trainable, total = count_parameters(model)  # as get_nb_trainable_parameters
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    backends = {s.quantization_backend for s in layers}
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for name, value in s.requires_grad.items():
            grads[name].append(value)
        for name, value in s.devices.items():
            devices[name].update(value)
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged(layers),
        requires_grad={n: _all_or_irregular(v) for n, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={n: sorted(d) for n, d in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )


__all__ = ["TunerLayerStatus", "TunerModelStatus", "count_parameters", "get_layer_status", "get_model_status", "layer_status"]
