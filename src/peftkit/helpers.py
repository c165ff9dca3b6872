"""Small helpers around a PeftModel, as Hugging Face PEFT's ``peft.helpers``.

* :func:`rescale_adapter_scale`: inside the context every LoRA scaling is multiplied,
  ``s' = multiplier · s``, so ``y = W x + multiplier · s B A x``; with ``multiplier`` in [0, 1] this
  interpolates between the base and the adapted model (WiSE-FT). Restored on exit, also on error.
* :func:`disable_input_dtype_casting`: inside the context adapter layers pass their input to the
  adapter's modules in its own dtype instead of casting it to the adapter weights' dtype (for
  hooks that cast the weights themselves, such as layer-wise casting).
* :class:`DoraCaching`: caching DoRA's weight norm in eval mode (:mod:`peftkit.core.caching`).
* :func:`check_if_peft_model`: whether a folder or Hub repo holds an adapter config.
* :func:`update_forward_signature`, :func:`update_generate_signature`, :func:`update_signature`:
  PEFT's helpers giving ``forward`` / ``generate`` the base model's signature and docstring; a
  peftkit PeftModel has them already, so they only check their argument.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Optional, Union

from torch import nn

from .config import PeftConfig
from .core.caching import set_weight_caching, weight_caching_enabled
from .core.layer import AdapterLayer
from .errors import ConfigError, PeftkitError
from .hotswap import lora_layers


def update_forward_signature(model: nn.Module) -> None:
    """Hugging Face PEFT's helper giving ``model.forward`` the base model's signature and docstring.
    A peftkit PeftModel's ``forward`` already carries them (:class:`peftkit.model_api.BaseSigned`), so
    there is nothing to do; kept for code that calls it."""


def update_generate_signature(model: nn.Module) -> None:
    """As :func:`update_forward_signature`, for ``generate`` (already the base model's)."""


def update_signature(model: nn.Module, method: str = "all") -> None:
    """:func:`update_forward_signature` (``method="forward"``), :func:`update_generate_signature`
    (``"generate"``) or both (``"all"``): nothing to do in peftkit; an unknown ``method`` is refused."""
    if method not in ("forward", "generate", "all"):
        raise ConfigError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")


def check_if_peft_model(model_name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether ``model_name_or_path`` (a local folder or a Hub repo) holds a readable adapter config.
    Any failure to read one (missing, broken, offline) answers False."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # noqa: BLE001 - every reason not to be an adapter answers False
        return False
    return True


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiply every LoRA scaling of ``model`` by ``multiplier`` inside the context (module doc).

    The scaling dicts are replaced (not edited), so the originals, tensors included, are put back
    on exit, also when the body raises. TypeError for a multiplier that is not a number; PeftkitError
    if the model has no LoRA layer."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise PeftkitError("scaling is only supported for models with `LoraLayer`s")
    originals = [layer.scaling for layer in layers]
    try:
        for layer in layers:
            layer.scaling = {name: value * multiplier for name, value in layer.scaling.items()}
            layer.clear_cache()
        yield
    finally:
        for layer, scaling in zip(layers, originals):
            layer.scaling = scaling
            layer.clear_cache()


@contextlib.contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Inside the context (if ``active``) adapter layers do not cast their input to the adapter
    weights' dtype (module doc); each layer's previous setting is restored on exit. LoRA layers
    honour it; other methods' layers keep their own casting."""
    if not active:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    previous = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(layers, previous):
            m.cast_input_dtype_enabled = value


class DoraCaching:
    """Cache DoRA's weight norm ``||W + s B A||`` while layers are in eval mode, trading memory for
    speed (the norm costs a ``B A`` product and a pass over ``W`` per forward).

    As a context manager it turns caching on (or off, ``enabled=False``) inside and restores the
    previous setting on exit; calling an instance sets it for good. Layers in train mode never
    cache; ``train()`` / ``eval()`` and a forward with caching off drop the caches, and a cached
    norm is recomputed when any tensor it depends on changed (:mod:`peftkit.core.caching`)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.prev_value: Optional[bool] = None

    def __enter__(self) -> "DoraCaching":
        self.prev_value = set_weight_caching(self.enabled)
        return self

    def __exit__(self, *exc: Any) -> None:
        set_weight_caching(bool(self.prev_value))
        self.prev_value = None

    def __call__(self, enabled: bool = True) -> None:
        set_weight_caching(enabled)

    @staticmethod
    def is_enabled() -> bool:
        """Whether DoRA caching is on now."""
        return weight_caching_enabled()


__all__ = [
    "DoraCaching",
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "rescale_adapter_scale",
    "update_forward_signature",
    "update_generate_signature",
    "update_signature",
]
