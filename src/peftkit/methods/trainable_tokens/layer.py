"""The trainable-tokens layer (the engine's :class:`~peftkit.core.trainable_tokens.TrainableTokensLayer`,
shared with LoRA's ``trainable_token_indices``), its factory and the tie of an output head.

Math (see :mod:`peftkit.core.trainable_tokens`): ``y = E'[x]`` with ``E'`` the table whose rows
``token_indices`` are replaced by the adapter's ``trainable_tokens_delta``; a tied ``lm_head``
computes ``x W'^T`` with the same replaced rows.
"""

from __future__ import annotations

from torch import nn

from ...core.layer import AdapterLayer
from ...core.targets import get_submodule_parent
from ...core.trainable_tokens import TrainableTokensLayer
from ...core.tying import input_embedding_key, tied_embedding_keys
from ...errors import TargetError
from .config import TrainableTokensConfig


def make_layer(target: nn.Module, config: TrainableTokensConfig, adapter_name: str, key: str) -> TrainableTokensLayer:
    """The TrainableTokensLayer around ``target`` (an nn.Embedding, or a tied nn.Linear head)."""
    layer = TrainableTokensLayer(target)
    layer.update_layer(adapter_name, config, key)
    return layer


def tie_output_heads(model: nn.Module, config: TrainableTokensConfig, adapter_name: str, keys: list[str]) -> None:
    """With tied embeddings: every head sharing the input embedding's weight gets (or becomes) a layer
    tied to the embedding's, as Hugging Face PEFT. Checks everything before changing anything."""
    emb_key = input_embedding_key(model)
    source = model.get_submodule(emb_key) if emb_key is not None else None
    if not isinstance(source, TrainableTokensLayer) or adapter_name not in source.token_indices:
        return
    plan = []
    for key in tied_embedding_keys(model):
        module = model.get_submodule(key)
        if isinstance(module, TrainableTokensLayer):
            if module.tied_adapter is source:
                continue
            if set(module.adapter_names) - {adapter_name}:
                raise TargetError(f"{key} holds trainable tokens of other adapters ({module.adapter_names}); it cannot "
                                  f"follow the tied input embedding {emb_key}.")
        elif isinstance(module, AdapterLayer):
            raise TargetError(f"{key} (tied to {emb_key}) already holds a {type(module).__name__}; its tokens cannot "
                              "follow the embedding's.")
        plan.append((key, module))
    for key, module in plan:
        if isinstance(module, TrainableTokensLayer):
            module.tie_to(source)
        else:
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, TrainableTokensLayer(module, tied_to=source))


__all__ = ["TrainableTokensLayer", "make_layer", "tie_output_heads"]
