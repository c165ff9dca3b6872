"""One frozen base model and the adapters installed on it, of every kind, for the server's engine.

Two hosts share the one base model (``base``, a transformers causal LM):

* **layer adapters** (LoRA and its variants, IA3, bottleneck adapters, ...) are injected into the base
  by a :class:`~peftkit.PeftModel` (``layers``); a batch routes row ``i`` through adapter ``names[i]``
  with :func:`~peftkit.core.mixed.mixed_batch`, the engine's mixed-batch kernels.
* **soft-prompt adapters** (prompt tuning, P-tuning, prefix tuning, P-tuning v2) live in a prompt model
  (``prompts``) wrapped around the same base. The server needs only what they add to a row, computed
  once when the adapter is installed (:class:`PromptTokens`): virtual input embeddings ``P`` (n, d),
  read as ``[P; E(x)]``, or per-layer key/value prefixes, written in front of the row's cache.

So a batch runs the base model once, with the layer adapters routed per row and the soft prompts laid
into the rows' inputs and caches. LoRA, IA3 and bottleneck layers stack on a shared module (default
LoRA and IA3 configs both adapt ``v_proj``); other layer methods need modules of their own, and an
adapter that cannot be installed fails its requests with the reason. Only the engine thread calls :meth:`install` and :meth:`remove` (between forward passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint import set_peft_model_state_dict
from ..config import PeftConfig
from ..core.mixed import BASE_ADAPTER
from ..errors import ConfigError, PeftkitError
from ..model import get_peft_model
from ..prompt.virtual import adapter_tokens, split_prefix
from ..registry import lookup


@dataclass
class PromptTokens:
    """What a soft-prompt adapter adds to each row that uses it.

    ``embeds``: (n, d) virtual input embeddings (prompt tuning, P-tuning), placed before the text.
    ``kv``: per decoder layer (keys, values), each (kv_heads, n, head_dim) (prefix tuning, P-tuning v2),
    placed in front of the row's cache. Exactly one of them is set.
    """

    embeds: Optional[torch.Tensor] = None
    kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def n(self) -> int:
        return self.embeds.shape[0] if self.embeds is not None else self.kv[0][0].shape[1]


def check_servable(model: nn.Module) -> None:
    """PeftkitError unless ``model`` is a decoder-only generative transformers model with a plain
    (full-attention, growing) key/value cache: what the engine's per-row cache handling needs."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise PeftkitError(f"{type(model).__name__} is not a transformers generative model; peftkit serve serves "
                           "causal language models.")
    if getattr(config, "is_encoder_decoder", False):
        raise PeftkitError("peftkit serve serves decoder-only causal language models; this model is an encoder-decoder "
                           "(use peftkit generate for it).")
    try:
        cache = DynamicCache(config=config)
    except Exception:  # configs transformers cannot read layer types from
        cache = DynamicCache()
    if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [])):
        raise PeftkitError(f"{type(model).__name__} uses sliding-window or other special cache layers, which the "
                           "server's per-row cache does not handle yet; serve it with peftkit generate.")


class AdapterHost:
    """The base model plus every installed adapter (see the module docstring)."""

    def __init__(self, model: nn.Module, base_name: str):
        check_servable(model)
        self.base = model.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base_name = base_name
        self.layers: Optional[nn.Module] = None  # the PeftModel of the layer adapters
        self.prompts: Optional[nn.Module] = None  # the prompt model of the soft-prompt adapters
        self.tokens: dict[str, PromptTokens] = {}
        self.methods: dict[str, str] = {}  # installed adapter -> its peft_type

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_input_embeddings().weight.dtype

    def installed(self) -> list[str]:
        return list(self.methods)

    def layer_name(self, name: str) -> str:
        """The name a row of adapter ``name`` carries through the layers ("__base__" unless a layer adapter)."""
        return name if name in self.methods and name not in self.tokens else BASE_ADAPTER

    # -- installing ----------------------------------------------------------------------------
    def install(self, name: str, config: PeftConfig, weights: dict[str, torch.Tensor], source: str) -> None:
        """Install adapter ``name`` (its config and tensors as read from ``source``). All-or-nothing."""
        if name in self.methods or name == self.base_name:
            raise ConfigError(f"An adapter named {name!r} is already installed.")
        method = lookup(config.peft_type)
        if method is None:
            raise ConfigError(f"{source}: unknown adapter type {config.peft_type!r}.")
        if config.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"{source} is a {config.task_type} adapter; peftkit serve serves CAUSAL_LM adapters.")
        if method.is_layer_method:
            self._install_layer(name, config, weights, source)
        else:
            self._install_prompt(name, config, weights, source)
        self.methods[name] = str(config.peft_type)

    def _add(self, attr: str, name: str, config: PeftConfig) -> bool:
        """Add ``name`` to the host model in ``attr`` ("layers" or "prompts"), creating it for the first
        adapter of its kind; True when it was created."""
        host = getattr(self, attr)
        if host is None:
            setattr(self, attr, get_peft_model(self.base, config, adapter_name=name))
            return True
        host.add_adapter(name, config)
        return False

    def _install_layer(self, name: str, config: PeftConfig, weights: dict, source: str) -> None:
        created = self._add("layers", name, config)
        try:
            set_peft_model_state_dict(self.layers, weights, name, source=source)
        except Exception:
            self._drop_layer(name, created)
            raise
        self.layers.eval()

    def _drop_layer(self, name: str, last: bool) -> None:
        if last:  # the host was made for this adapter: take every wrapper out again
            self.layers.unload()  # type: ignore[union-attr]
            self.layers = None
        else:
            self.layers.delete_adapter(name)  # type: ignore[union-attr]

    def _install_prompt(self, name: str, config: PeftConfig, weights: dict, source: str) -> None:
        created = self._add("prompts", name, config)
        try:
            set_peft_model_state_dict(self.prompts, weights, name, source=source)
            self.prompts.eval()
            with torch.no_grad():
                tokens = adapter_tokens(self.prompts, name)
                if config.uses_kv_prefix:
                    kv = split_prefix(self.prompts, tokens.unsqueeze(0).to(self.dtype), name)
                    self.tokens[name] = PromptTokens(kv=[(k[0], v[0]) for k, v in kv])
                else:
                    self.tokens[name] = PromptTokens(embeds=tokens.to(self.dtype))
        except Exception:
            if created:
                self.prompts = None
            else:
                self.prompts.delete_adapter(name)
            raise

    def remove(self, name: str) -> None:
        """Take adapter ``name`` out of the model (its tensors freed)."""
        if name not in self.methods:
            raise PeftkitError(f"Adapter {name!r} is not installed.")
        if name in self.tokens:
            del self.tokens[name]
            if len(self.prompts.peft_config) == 1:  # type: ignore[union-attr]
                self.prompts = None
            else:
                self.prompts.delete_adapter(name)  # type: ignore[union-attr]
        else:
            self._drop_layer(name, len(self.layers.peft_config) == 1)  # type: ignore[union-attr]
        del self.methods[name]

    def describe(self, name: str) -> dict[str, Any]:
        """Facts about an installed adapter for /v1/models."""
        return {"method": self.methods[name], "kind": "prompt" if name in self.tokens else "layer"}


__all__ = ["AdapterHost", "PromptTokens", "check_servable"]
