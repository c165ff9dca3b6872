"""Encoder prefixes (``PrefixTuningConfig(encoder_prefix=True)``) on encoder-decoder models.

The encoder stack passes no cache to its layers, so for the duration of a call a forward pre-hook
on each encoder self-attention module hands it a one-layer ``DynamicCache`` holding its prefix as
its own ``past_key_values`` argument, and puts the prefix columns in front of its attention mask.
The module's code runs unchanged (T5 then counts the text's relative positions from the prefix
length); the hooks are removed when the call returns.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from ..errors import PeftkitError
from .introspect import accepts

# base model -> its encoder layers, found once per model
_FOUND: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def prefix_mask(mask: Any, keep: torch.Tensor, full: bool, hidden: torch.Tensor, module: nn.Module) -> Any:
    """An encoder attention mask over ``[prefix; text]`` keys from one over the text keys.

    ``keep`` (B, n) marks the prefix columns a row reads. Handles the mask forms transformers
    builds: ``None`` (attend to all), boolean or additive float ``(B|1, 1, q, k)``, and a 2-D
    ``(B, k)`` padding mask."""
    B, n = keep.shape
    if mask is None:
        if full:
            return None
        q = k = hidden.shape[1]
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
        if implementation == "eager":
            mask = torch.zeros(B, 1, q, k, dtype=hidden.dtype, device=hidden.device)
        else:
            mask = torch.ones(B, 1, q, k, dtype=torch.bool, device=hidden.device)
    if not isinstance(mask, torch.Tensor):
        raise PeftkitError(f"encoder_prefix cannot extend an attention mask of type {type(mask).__name__} (flex "
                           "attention); load the model with attn_implementation='eager' or 'sdpa'.")
    if mask.dim() == 2:
        return torch.cat([keep.to(mask.dtype), mask], dim=1)
    if mask.dim() != 4:
        raise PeftkitError(f"encoder_prefix cannot extend a {mask.dim()}-D attention mask.")
    mask = mask.expand(B, -1, -1, -1)
    cols = keep.bool()[:, None, None, :].expand(B, 1, mask.shape[2], n)
    if mask.dtype != torch.bool:
        cols = torch.zeros(cols.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~cols, torch.finfo(mask.dtype).min)
    return torch.cat([cols, mask], dim=-1)


def encoder_layers(base: nn.Module) -> list[tuple[nn.Module, inspect.Signature, Optional[str]]]:
    """Per encoder layer, found once: the innermost attention module for that ``layer_idx`` whose
    forward takes ``past_key_values``, its forward's signature and the name of its mask argument."""
    found = _FOUND.get(base)
    if found is not None:
        return found
    encoder = base.get_encoder() if hasattr(base, "get_encoder") else None
    by_layer: dict[int, nn.Module] = {}
    if isinstance(encoder, nn.Module):
        for module in encoder.modules():
            name = type(module).__name__.lower()
            idx = getattr(module, "layer_idx", None)
            if ("attention" in name or "attn" in name) and isinstance(idx, int) \
                    and accepts(module.forward, "past_key_values"):
                by_layer[idx] = module  # modules() is pre-order: a later match is nested deeper
    if not by_layer or sorted(by_layer) != list(range(len(by_layer))):
        raise PeftkitError(
            f"encoder_prefix=True needs encoder self-attention layers that take past_key_values and know their "
            f"layer index; {type(base).__name__}'s encoder has none. Leave encoder_prefix unset to put the "
            "prefixes on the decoder only."
        )
    found = []
    for i in range(len(by_layer)):
        signature = inspect.signature(by_layer[i].forward)
        mask_arg = next((a for a in ("attention_mask", "mask") if a in signature.parameters), None)
        found.append((by_layer[i], signature, mask_arg))
    _FOUND[base] = found
    return found


def encoder_attentions(base: nn.Module) -> list[nn.Module]:
    """The encoder's self-attention modules in layer order (encoder-decoder models)."""
    return [module for module, _, _ in encoder_layers(base)]


@contextlib.contextmanager
def encoder_prefixes(base: nn.Module, enc_kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]],
                     keep: Optional[torch.Tensor], full: bool) -> Iterator[None]:
    """While active, encoder self-attention layer ``j`` of ``base`` reads ``enc_kv[j]`` before its keys and
    values: a forward pre-hook passes a one-layer ``DynamicCache`` holding the prefix as the
    module's own ``past_key_values`` argument (built anew per call, so the encoder may run any
    number of times) and puts the prefix columns in front of its attention mask (``keep`` (B, n) marks
    the columns each row reads; ``full``: every row reads all of them)."""
    if enc_kv is None:
        yield
        return
    from transformers import DynamicCache

    handles = []

    def hook_for(signature: inspect.Signature, mask_arg: Optional[str], key: torch.Tensor, value: torch.Tensor
                 ) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            bound = signature.bind(*args, **kwargs)
            given = bound.arguments
            hidden = given.get("hidden_states", args[0] if args else None)
            if given.get("past_key_values") is not None or given.get("key_value_states") is not None:
                raise PeftkitError("An encoder attention layer was called with a cache or as cross-attention; "
                                   "encoder_prefix cannot be applied to it.")
            if hidden is None or hidden.shape[0] != key.shape[0]:
                raise PeftkitError("The encoder ran on a batch of another size than the prefixes were built for; "
                                   "pass the inputs to the PeftModel (forward or generate), not encoder_outputs.")
            cache = DynamicCache()
            cache.update(key.to(hidden.dtype), value.to(hidden.dtype), mod.layer_idx)
            given["past_key_values"] = cache
            if mask_arg is not None:
                given[mask_arg] = prefix_mask(given.get(mask_arg), keep, full, hidden, mod)
            return bound.args, bound.kwargs

        return hook

    try:
        for (module, signature, mask_arg), (key, value) in zip(encoder_layers(base), enc_kv):
            handles.append(module.register_forward_pre_hook(hook_for(signature, mask_arg, key, value),
                                                            with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["encoder_attentions", "encoder_layers", "encoder_prefixes", "prefix_mask"]
