"""Merging the adapters of a whole model: all or nothing, and exact when weights are shared.

:func:`merge_layers` runs in three steps. First every layer is asked whether its merge would work
(:meth:`~peftkit.core.layer.AdapterLayer.check_merge`: the layer can be merged; with ``safe_merge``
the merged weights are computed and checked for NaN/inf), so a failure changes nothing. Then the
base tensors of the layers to merge that are shared with modules outside them are untied
(:func:`untie_shared_weights`). Then the layers merge.

Why untie: with tied input/output embeddings (``tie_word_embeddings``, as in the bundled model) the
output head's weight *is* the embedding table. Merging a LoRA delta into ``lm_head`` would also add
it to the input embeddings, and the merged model would compute something else than the adapted one.
So the merged layer first gets its own copy of the weight (the other module keeps the original), and
``config.tie_word_embeddings`` becomes False so that saving and reloading the model keeps them apart.
It costs one more weight matrix; unmerging does not tie them again.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

from torch import nn

from ..errors import MergeError, PeftkitWarning
from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper


def layers_to_merge(layers: Sequence[tuple[str, AdapterLayer]], adapter_names: Optional[Sequence[str]]
                    ) -> list[tuple[str, AdapterLayer]]:
    """The (key, layer) pairs that have something to merge (modules_to_save wrappers never do)."""
    return [(key, layer) for key, layer in layers
            if not isinstance(layer, ModulesToSaveWrapper) and layer.adapters_to_merge(adapter_names)]


def warn_merged_already(layers: Sequence[tuple[str, AdapterLayer]], adapter_names: Optional[Sequence[str]]) -> None:
    """A warning when a layer to merge holds merged adapters already (Hugging Face PEFT's phrases)."""
    merged = list(dict.fromkeys(n for _, layer in layers for n in layer.merged_adapters))
    if not merged:
        return
    todo = list(dict.fromkeys(n for _, layer in layers for n in layer.adapters_to_merge(adapter_names)))
    if todo:
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally merging "
                      f"{','.join(todo)}.", PeftkitWarning, stacklevel=3)
    else:
        warnings.warn("All adapters are already merged, nothing to do.", PeftkitWarning, stacklevel=3)


def check_merges(layers: Sequence[tuple[str, AdapterLayer]], adapter_names: Optional[Sequence[str]],
                 safe_merge: bool) -> None:
    """MergeError naming the layer if any of ``layers`` cannot merge ``adapter_names``; changes nothing."""
    for key, layer in layers:
        try:
            layer.check_merge(adapter_names, safe_merge)
        except MergeError as exc:
            raise MergeError(f"{key}: {exc}") from None


def untie_shared_weights(model: nn.Module, layers: Sequence[tuple[str, AdapterLayer]]) -> list[str]:
    """Give each layer's base module its own copy of every parameter it shares with a module outside
    the layer (tied embeddings); returns the keys of the parameters copied."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    untied = []
    key_of = {id(layer): key for key, layer in layers}
    for key, layer in layers:
        base = layer.get_base_layer()
        own = [key + "."] + [key_of[id(t)] + "." for t in layer.tied_layers() if id(t) in key_of]
        for name, p in list(base.named_parameters(remove_duplicate=False)):
            if all(n.startswith(tuple(own)) for n in owners.get(id(p), [])):
                continue
            module_path, _, attr = name.rpartition(".")
            module = base.get_submodule(module_path) if module_path else base
            setattr(module, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            untied.append(f"{key}.{name}")
    if untied:
        untie_config(model)
        warnings.warn(f"Merging into {', '.join(untied)}, shared with another module (tied embeddings): the merged "
                      "layer got its own copy, so that the other keeps the original values, and tie_word_embeddings "
                      "was set to False.", PeftkitWarning, stacklevel=4)
    return untied


def _weight_of(module: Optional[nn.Module]) -> Optional[object]:
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    return getattr(module, "weight", None)


def untie_config(model: nn.Module) -> None:
    """``tie_word_embeddings = False`` in the model's config(s) when its input and output embedding
    weights are no longer one tensor (so that transformers does not tie them again on reload)."""
    try:
        emb_in = _weight_of(model.get_input_embeddings())
        emb_out = _weight_of(model.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        return
    if emb_in is None or emb_out is None or emb_in is emb_out:
        return
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    for cfg in (config, text):
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def check_stack_order(todo: Sequence[tuple[str, AdapterLayer]], adapter_names: Optional[Sequence[str]]) -> None:
    """MergeError if an adapter would merge while another method's layer inside it (stacked on the same
    module) keeps unmerged adapters: the inner layer's output feeds the outer one, so a merged outer
    delta would apply to the inner adapters' rows in the wrong order. Merge the inner ones first (or
    together: inner layers merge first)."""
    merging = {id(layer): set(layer.adapters_to_merge(adapter_names)) for _, layer in todo}
    for key, layer in todo:
        inner = layer.base_layer
        while isinstance(inner, AdapterLayer):
            if layer.stacks_another_method(inner):
                left = [n for n in inner.adapter_names
                        if n not in inner.merged_adapters and n not in merging.get(id(inner), set())]
                if left:
                    raise MergeError(f"{key}: its adapters wrap {type(inner).__name__} adapters {left} of another "
                                     "method on the same module; merge those first (or in the same call).")
            inner = inner.base_layer


def prepare_merge(model: nn.Module, layers: Sequence[tuple[str, AdapterLayer]],
                  adapter_names: Optional[Sequence[str]], safe_merge: bool) -> list[tuple[str, AdapterLayer]]:
    """The first two steps of a merge (see the module doc): every layer of ``layers`` that has something
    to merge is checked, then its shared weights are untied. Returns those layers."""
    todo = layers_to_merge(layers, adapter_names)
    check_merges(todo, adapter_names, safe_merge)
    check_stack_order(todo, adapter_names)
    untie_shared_weights(model, todo)
    return todo


def merge_layers(model: nn.Module, layers: Sequence[tuple[str, AdapterLayer]],
                 adapter_names: Optional[Sequence[str]], safe_merge: bool) -> None:
    """Merge ``adapter_names`` (None: each layer's active adapters) into ``layers`` of ``model``: all
    checked first, shared weights untied, then merged (see the module doc). Warns, as Hugging Face PEFT
    does, when adapters are merged already."""
    warn_merged_already(layers, adapter_names)
    for _, layer in reversed(prepare_merge(model, layers, adapter_names, safe_merge)):  # inner layers first
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)


__all__ = ["check_merges", "check_stack_order", "layers_to_merge", "merge_layers", "prepare_merge", "untie_config",
           "untie_shared_weights"]
