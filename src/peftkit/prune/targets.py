"""Which layers pruning works on, and their weights in the (out, in) layout.

Prunable layers are ``nn.Linear`` and transformers' GPT-2-style ``Conv1D`` (a linear layer whose
weight is stored transposed, (in, out)). An adapter layer (LoRA & co.) stands for its base layer,
under the wrapper's name, so a wrapped model prunes like the original. By default every prunable
layer is a target except the output head (``get_output_embeddings()`` and the names of
:data:`DEFAULT_EXCLUDE`); embeddings are never targets (they are not linear layers).

``target_modules`` and ``exclude`` take the forms of peftkit's LoRA targets
(:func:`peftkit.core.targets.matches_names`): a list of names (exact, or a dotted suffix of the module
name: ``"q_proj"``, ``"mlp.down_proj"``) or a regex string (full match).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.dispatch import is_conv1d_transposed
from ..core.layer import AdapterLayer
from ..core.targets import closest_module_names, linear_module_names, matches_names, outer_modules
from ..errors import ConfigError, TargetError
from ..quant import is_quantized_module

# Task heads never pruned unless ``exclude`` says otherwise (Wanda and SparseGPT keep the head dense).
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "embed_out", "output_layer", "classifier", "score", "qa_outputs")

Names = Union[None, str, Sequence[str]]


def is_prunable(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers ``Conv1D`` (quantized linears are not: their weights are codes)."""
    return (isinstance(module, nn.Linear) or is_conv1d_transposed(module)) and not is_quantized_module(module)


def base_of(module: nn.Module) -> nn.Module:
    """The module that holds the weight: an adapter layer's innermost base layer, else ``module``."""
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): ``Conv1D``'s (in, out) weight transposed (a view), else as stored."""
    weight = module.weight
    return weight.t() if is_conv1d_transposed(module) else weight


def to_stored(mask_oi: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A (out, in) mask in the layout ``module`` stores its weight in (contiguous)."""
    return (mask_oi.t() if is_conv1d_transposed(module) else mask_oi).contiguous()


def in_features(module: nn.Module) -> int:
    """The input width of a prunable layer."""
    return weight_oi(module).shape[1]


def check_names(value: Names, what: str) -> Names:
    """``value`` is None, a regex string, or a list/tuple of strings; ConfigError otherwise."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{what} must be None, a regex string or a list of module names, got {value!r}.")


def prune_targets(model: nn.Module, target_modules: Names = None,
                  exclude: Names = DEFAULT_EXCLUDE) -> dict[str, nn.Module]:
    """{module name: the layer holding the weight} of every layer to prune, in model order.

    ``target_modules`` None (or ``"all-linear"``): every prunable layer but the output head. Names in
    ``exclude`` are dropped. TargetError when nothing is left, when a list entry names no prunable
    layer, or when a named module is not a linear layer; ConfigError for a quantized target or a
    weight shared with a module that is not a target (tied embeddings)."""
    target_modules = check_names(target_modules, "target_modules")
    exclude = check_names(exclude, "exclude") or []
    if target_modules == "all-linear":
        target_modules = None
    default = linear_module_names(model) if target_modules is None else None
    found: dict[str, nn.Module] = {}
    matched: set[str] = set()
    for key, module in outer_modules(model):
        if not key or not _wanted(key, target_modules, default):
            continue
        base = base_of(module)
        if not (is_prunable(base) or is_quantized_module(base)):
            if target_modules is not None and not isinstance(target_modules, str):
                raise TargetError(f"{key} is a {type(base).__name__}; pruning targets nn.Linear and transformers "
                                  "Conv1D layers: name the linear layers inside it (e.g. 'q_proj', 'mlp.down_proj').")
            continue
        matched.add(key)
        if exclude and matches_names(key, exclude):
            continue
        found[key] = base
    _check_found(model, found, matched, target_modules, exclude)
    for key, base in found.items():
        if is_quantized_module(base):
            raise ConfigError(f"{key} is already quantized ({type(base).__name__}): its weight is stored as codes. "
                              "Prune the float model before quantize_model(), or dequantize_model() it first.")
    check_not_shared(model, found)
    return found


def _wanted(key: str, target_modules: Names, default: Optional[set[str]]) -> bool:
    if target_modules is None:
        return default is not None and key in default
    return matches_names(key, target_modules)


def _check_found(model: nn.Module, found: dict[str, nn.Module], matched: set[str], target_modules: Names,
                 exclude: Any) -> None:
    if isinstance(target_modules, list):
        for entry in target_modules:
            if not any(k == entry or k.endswith("." + entry) for k in matched):
                hints = closest_module_names(model, entry)
                raise TargetError(f"target_modules entry {entry!r} names no nn.Linear / Conv1D layer of the model."
                                  + (f" Closest module names: {', '.join(hints)}." if hints else ""))
    if found:
        return
    if matched:
        raise TargetError(f"Every layer matched by target_modules={target_modules!r} is excluded by "
                          f"exclude={exclude!r} (e.g. {sorted(matched)[0]}); pass exclude=() to prune it anyway.")
    what = ("no nn.Linear / Conv1D layer" if target_modules is None
            else f"target_modules={target_modules!r} matched nothing")
    hints = closest_module_names(model, target_modules) if isinstance(target_modules, str) else []
    raise TargetError(f"Nothing to prune: {what} in the model (the output head is never a default target)."
                      + (f" Closest module names: {', '.join(hints)}." if hints else ""))


def check_not_shared(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    """ConfigError if a target's weight is also held by another module (tied weights: pruning one
    would prune the other)."""
    owners = {id(module.weight): (key, module) for key, module in targets.items()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in owners:
            continue
        key, module = owners[id(param)]
        path, _, _ = name.rpartition(".")
        holder = model.get_submodule(path) if path else model
        if holder is not module:
            raise ConfigError(f"The weight of {key} is shared with {name} (tied weights): pruning it would prune "
                              f"{path or 'the model'} too. Untie the weights or leave {key} out.")


__all__ = ["DEFAULT_EXCLUDE", "base_of", "check_names", "check_not_shared", "in_features", "is_prunable",
           "prune_targets", "to_stored", "weight_oi"]
