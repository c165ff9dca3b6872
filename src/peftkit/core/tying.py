"""Tied input/output embeddings and the modules trained beside an adapter over them.

With ``tie_word_embeddings`` the output head's weight *is* the input embedding table. Hugging Face
PEFT keeps that tie for what an adapter trains on the embedding, and so does peftkit:

* trainable tokens (``LoraConfig.trainable_token_indices``, the TRAINABLE_TOKENS method): the head
  gets a layer tied to the embedding's, which shares its tensors (:func:`wrap_trainable_tokens`);
* ``modules_to_save`` with ``ensure_weight_tying=True``: the embedding is trained in full and the
  head's copy shares the copy's weight (:func:`tie_config` before injection, :func:`tie_modules_to_save`
  after).

A model counts as tied when its config says ``tie_word_embeddings`` (a plain module without a
config never does, as in Hugging Face PEFT) and a module's ``weight`` is the input embedding's.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from ..errors import ConfigError, PeftkitWarning, TargetError
from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .targets import get_submodule_parent, outer_modules
from .trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper

if TYPE_CHECKING:
    from ..config import PeftConfig

# module names Hugging Face PEFT treats as embedding layers (for ensure_weight_tying)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _base(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def input_embedding_key(model: nn.Module, default: Optional[str] = None) -> Optional[str]:
    """The module key of ``model.get_input_embeddings()`` (``model.embed_tokens``), else ``default``."""
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is None:
        return default
    return next((k for k, m in model.named_modules() if m is emb), default)


def ties_word_embeddings(model: nn.Module) -> bool:
    """The model's config (or its text config) says ``tie_word_embeddings``."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def tied_embedding_keys(model: nn.Module) -> list[str]:
    """Keys of the modules whose weight is the input embedding's (the tied output head), looking
    through adapter layers; empty unless the config ties the embeddings."""
    key = input_embedding_key(model)
    if key is None or not ties_word_embeddings(model):
        return []
    emb = _base(model.get_submodule(key))
    weight = getattr(emb, "weight", None)
    out = []
    for k, module in outer_modules(model):
        base = _base(module)
        if k != key and base is not emb and weight is not None and getattr(base, "weight", None) is weight:
            out.append(k)
    return out


def _matches(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


# ---------------------------------------------------------------------------------------------
# trainable tokens beside an adapter (LoraConfig.trainable_token_indices)


def token_targets(model: nn.Module, indices: Any) -> dict[str, list[int]]:
    """``trainable_token_indices`` as {module name: indices} (a list targets the input embedding)."""
    if isinstance(indices, dict):
        return {str(k): list(v) for k, v in indices.items()}
    return {input_embedding_key(model, "embed_tokens"): list(indices)}


def _skipped_tied(model: nn.Module, targets: dict[str, list[int]], ensure: bool) -> tuple[set[str], bool]:
    """(target names left to the tie, whether tied targets have different indices), as Hugging Face
    PEFT: when the embedding and its tied head are both named, the head follows the embedding if
    their indices agree; ConfigError if they differ and ``ensure_weight_tying`` is set."""
    emb_key = input_embedding_key(model) or ""
    tied = tied_embedding_keys(model)
    named = [n for n in targets if _matches(emb_key, n) or any(_matches(t, n) for t in tied)]
    if len(targets) < 2 or len(named) < 2:
        return set(), False
    first = targets[named[0]]
    mismatch = any(targets[n] != first for n in named[1:])
    if mismatch and ensure:
        info = ", ".join(f"{n}: {targets[n]}" for n in named)
        raise ConfigError(f"ensure_weight_tying=True but the tied layers get different token indices ({info}); give "
                          "them the same indices or set ensure_weight_tying=False.")
    return (set() if mismatch else {n for n in named if not _matches(emb_key, n)}), mismatch


def wrap_trainable_tokens(model: nn.Module, config: "PeftConfig", adapter_name: str) -> list[str]:
    """Wrap the layers ``config.trainable_token_indices`` names for ``adapter_name`` (all or nothing);
    a head tied to the input embedding follows it. Returns the keys wrapped or extended."""
    indices = getattr(config, "trainable_token_indices", None)
    if indices is None:
        return []
    targets = token_targets(model, indices)
    for name in targets:
        if any(_matches(name, m) or _matches(m, name) for m in getattr(config, "modules_to_save", None) or []):
            raise ConfigError(f"{name} is both in modules_to_save (trained in full) and in trainable_token_indices; "
                              "use one of them.")
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    tied_model = ties_word_embeddings(model)
    skip, mismatch = _skipped_tied(model, targets, ensure) if tied_model else (set(), False)
    done: list[str] = []
    try:
        for name, token_ids in targets.items():
            if name not in skip:
                done += _wrap_tokens(model, name, token_ids, adapter_name)
        if ensure and not tied_model:
            warnings.warn("ensure_weight_tying=True but the model does not tie its embeddings (tie_word_embeddings="
                          "False): trainable tokens are not tied.", PeftkitWarning, stacklevel=3)
        source = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if tied_model and isinstance(source, TrainableTokensWrapper) and adapter_name in source.token_indices \
                and (ensure or not mismatch):
            for key in tied_embedding_keys(model):
                done.append(_tie_wrapper(model, key, source, adapter_name))
    except Exception:
        remove_token_adapter(model, adapter_name)
        raise
    return done


def _wrap_tokens(model: nn.Module, name: str, token_ids: list[int], adapter_name: str) -> list[str]:
    keys = [k for k, _ in outer_modules(model) if k and _matches(k, name)]
    if not keys:
        raise TargetError(f"trainable_token_indices: {name!r} matches no module of the model; use the name of an "
                          "embedding layer (e.g. 'embed_tokens').")
    for key in keys:
        module = model.get_submodule(key)
        if isinstance(module, TrainableTokensWrapper):
            module.update_tokens(adapter_name, token_ids, key=key)
        elif isinstance(module, AdapterLayer):
            raise TargetError(f"{key} already holds a {type(module).__name__}; trainable tokens cannot also go there.")
        else:
            layer = TrainableTokensWrapper(module)
            layer.update_tokens(adapter_name, token_ids, key=key)
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, layer)
    return keys


def _tie_wrapper(model: nn.Module, key: str, source: TrainableTokensWrapper, adapter_name: str) -> str:
    module = model.get_submodule(key)
    if isinstance(module, TrainableTokensWrapper):
        if module.tied_adapter is None and module.adapter_names == [adapter_name] \
                and module.token_indices[adapter_name] == source.token_indices[adapter_name]:
            module.tie_to(source)  # named separately (e.g. by a short name) with the same tokens: follows
        return key  # tied by an earlier adapter (shares the new one already), or other tokens: kept apart
    if isinstance(module, AdapterLayer):
        raise TargetError(f"{key} (tied to the input embedding) already holds a {type(module).__name__}; its trainable "
                          "tokens cannot follow the embedding's.")
    parent, child = get_submodule_parent(model, key)
    setattr(parent, child, TrainableTokensWrapper(module, tied_to=source))
    return key


def remove_token_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop ``adapter_name``'s trainable tokens; wrappers left with none give their place back."""
    holding = [(k, m) for k, m in outer_modules(model)
               if isinstance(m, TrainableTokensWrapper) and adapter_name in m.adapter_names]
    for _, module in holding:
        module.delete_adapter(adapter_name)
    for key, module in holding:
        if not module.adapter_names:
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, module.base_layer)


# ---------------------------------------------------------------------------------------------
# modules_to_save with ensure_weight_tying


def tie_config(config: "PeftConfig", model: nn.Module) -> None:
    """``ensure_weight_tying``: with a tied model and an embedding in ``modules_to_save``, the input
    embedding is trained in full and the tied heads follow it (``config.modules_to_tie``, not saved);
    warnings as Hugging Face PEFT when there is nothing to tie. Edits ``config`` in place."""
    config.modules_to_tie = None
    tied = tied_embedding_keys(model)
    to_save = list(getattr(config, "modules_to_save", None) or [])
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        targeted = any(re.fullmatch(targets, n) for n in EMBEDDING_LAYER_NAMES)
    else:
        targeted = any(str(t).rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for t in targets or [])
    saved = any(m.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for m in to_save)
    if not getattr(config, "ensure_weight_tying", False):
        if tied and (saved or targeted):
            warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                          "`ensure_weight_tying` is not set to True. The adapter's copy of the layer is trained "
                          "untied, which complicates merging and conversion; set ensure_weight_tying=True to keep the "
                          "layers tied.", PeftkitWarning, stacklevel=4)
        return
    if not tied:
        if getattr(config, "trainable_token_indices", None) is None:
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model: "
                          "nothing to tie.", PeftkitWarning, stacklevel=4)
        return
    if saved:
        emb = input_embedding_key(model)
        kept = [m for m in to_save if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", k) for k in tied)]
        config.modules_to_save = kept + ([emb] if emb not in kept else [])
        config.modules_to_tie = tied
    elif targeted:
        raise ConfigError("ensure_weight_tying=True with LoRA on a tied embed_tokens / lm_head (target_modules) is not "
                          "supported by peftkit; target one of them, use modules_to_save or trainable_token_indices, or "
                          "load the model with tie_word_embeddings=False.")
    elif getattr(config, "trainable_token_indices", None) is None:
        warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                      "`modules_to_save` or `target_modules` (or trainable_token_indices): nothing to tie.",
                      PeftkitWarning, stacklevel=4)


def tie_modules_to_save(model: nn.Module, config: "PeftConfig", adapter_name: str) -> None:
    """Wrap each head of ``config.modules_to_tie`` in a ModulesToSaveWrapper whose copy for
    ``adapter_name`` shares the weight of the input embedding's copy."""
    keys = getattr(config, "modules_to_tie", None)
    if not keys:
        return
    source = model.get_input_embeddings()
    if not isinstance(source, ModulesToSaveWrapper) or adapter_name not in source.modules_to_save:
        raise TargetError("ensure_weight_tying: the input embedding is not in modules_to_save; nothing to tie to.")
    weight = source.modules_to_save[adapter_name].weight
    for key in keys:
        module = model.get_submodule(key)
        if not isinstance(module, ModulesToSaveWrapper):
            if isinstance(module, AdapterLayer):
                raise TargetError(f"{key} already holds a {type(module).__name__}; it cannot follow the embedding.")
            wrapper = ModulesToSaveWrapper(module)
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, wrapper)
            module = wrapper
        original = module.original_module
        head = copy.deepcopy(original, memo={id(original.weight): weight})  # the copy shares the embedding's
        module.modules_to_save[adapter_name] = head


__all__ = ["EMBEDDING_LAYER_NAMES", "input_embedding_key", "remove_token_adapter", "tie_config", "tie_modules_to_save",
           "tied_embedding_keys", "ties_word_embeddings", "token_targets", "wrap_trainable_tokens"]
