"""Hugging Face PEFT's conveniences on a PeftModel that code written against PEFT calls: parameter
counts, ``has_active_enabled_adapter``, ``set_requires_grad``, the status reports, the model card.

A mixin of :class:`peftkit.PeftModel` (kept apart so that model.py holds the adapter bookkeeping
only); it reads ``peft_config``, ``active_adapters``, ``base_model`` and the layers of the model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .config import PeftConfig
from .core.inject import adapter_layers
from .core.names import name_list
from .errors import AdapterNameError, PeftkitWarning
from .model_card import model_hub_name, write_model_card
from .status import TunerLayerStatus, TunerModelStatus, count_parameters, get_layer_status, get_model_status


class BaseSigned(functools.partial):
    # A PeftModel method bound to its model whose signature, docstring and annotations are the wrapped
    # model's (plus ``adapter_names``): tools that choose a batch's columns from
    # ``inspect.signature(model.forward)`` (transformers' Trainer with ``remove_unused_columns``) see
    # ``input_ids``, ``labels``, ... Computed only when read. (No class docstring: ``__doc__`` is a property.)

    @property
    def __signature__(self) -> inspect.Signature:  # type: ignore[override]
        return base_signature(self.args[0], self.func.__name__)

    @property
    def __doc__(self) -> Optional[str]:  # type: ignore[override]
        base = getattr(self.args[0].get_base_model(), self.func.__name__, None)
        return base.__doc__ if callable(base) else self.func.__doc__

    @property
    def __annotations__(self) -> dict:  # type: ignore[override]
        base = getattr(self.args[0].get_base_model(), self.func.__name__, None)
        return dict(getattr(base, "__annotations__", {}) if callable(base) else self.func.__annotations__)


def base_signature(model: Any, name: str) -> inspect.Signature:
    """The signature of the wrapped model's method ``name`` with a keyword ``adapter_names=None``
    (before its ``**kwargs``); the PeftModel's own when the wrapped model has no such method."""
    target = getattr(model.get_base_model(), name, None)
    if not callable(target):
        own = inspect.signature(getattr(type(model), name))
        return own.replace(parameters=list(own.parameters.values())[1:])
    sig = inspect.signature(target)
    params = list(sig.parameters.values())
    if "adapter_names" not in sig.parameters:
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    return sig.replace(parameters=params)


class signed_by_base:  # noqa: N801  (used as a decorator, like property)
    """Method decorator: ``model.<method>`` is the method bound as :class:`BaseSigned`."""

    def __init__(self, func: Any) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        return self.func if obj is None else BaseSigned(self.func, obj)


class PeftModelApi:
    """The Hugging Face PEFT names of a PeftModel that are not adapter bookkeeping."""

    peft_config: dict[str, PeftConfig]
    base_model: nn.Module
    _disabled: bool

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)  # type: ignore[arg-type]

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn training of the given adapters' tensors on or off (layer methods only)."""
        names = name_list(adapter_names, "set_requires_grad")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"Adapter {unknown[0]} does not exist; loaded adapters: {list(self.peft_config)}.")
        if any(self.peft_config[n].is_prompt_learning for n in names):
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods; their encoder "
                            "trains while its adapter is active.")
        for _, layer in adapter_layers(self.base_model):
            for name in names:
                for _, tensor in layer.adapter_param_items(name):
                    tensor.requires_grad_(requires_grad)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the context the model computes its base output (merged adapters are unmerged)."""
        layers = [layer for _, layer in adapter_layers(self.base_model)]
        frozen = [t for layer in layers for name in layer.adapter_names for _, t in layer.adapter_param_items(name)
                  if t.requires_grad]  # disabled adapters do not train (as in Hugging Face PEFT)
        states = {layer.disabled for layer in layers}
        if len(states) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                          "will be enabled", PeftkitWarning, stacklevel=3)
        all_disabled = states == {True}  # a nested context leaves the adapters disabled; else all are enabled again
        was_disabled = self._disabled
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        for t in frozen:
            t.requires_grad_(False)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = was_disabled
            for layer in layers:
                layer.disabled = all_disabled
            for t in frozen:
                t.requires_grad_(True)

    # -- state --------------------------------------------------------------------------------
    @property
    def peft_type(self) -> Any:
        """The method of the active adapter (``PeftType.LORA``, ...)."""
        return self.active_peft_config.peft_type  # type: ignore[attr-defined]

    @property
    def _is_prompt_learning(self) -> bool:
        return bool(self.peft_config) and self.active_peft_config.is_prompt_learning  # type: ignore[attr-defined]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside ``disable_adapter()`` or when no adapter is active."""
        return not self._disabled and bool(self.active_adapters)  # type: ignore[attr-defined]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The module names every adapter trains in full (``modules_to_save`` of all configs), or None."""
        names = {m for c in self.peft_config.values() for m in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base_model, "dtype", None)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        return get_layer_status(self)  # type: ignore[arg-type]

    def get_model_status(self) -> TunerModelStatus:
        return get_model_status(self)  # type: ignore[arg-type]

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write or update ``output_dir/README.md`` for the active adapter (see :mod:`peftkit.model_card`)."""
        config = self.active_peft_config  # type: ignore[attr-defined]
        write_model_card(output_dir, model_hub_name(self), str(config.peft_type),
                         str(config.task_type) if config.task_type else None, config.to_dict())


__all__ = ["BaseSigned", "PeftModelApi", "base_signature", "signed_by_base"]
