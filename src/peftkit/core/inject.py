"""Injection and unloading: the one place where modules of a user's model are replaced.

:func:`inject` wraps every module a config targets in the method's layer (from the registry:
:func:`peftkit.registry.method_for`) or adds the adapter to the wrapper already there, then every
parameter its ``target_parameters`` names (one wrapper per parameter; wrappers of parameters of one
module nest, the first parameter innermost);
:func:`unload` puts the base modules back, merging first if asked. :func:`prepare_config` fills the
fields a config takes from the model (default targets per model type, task heads). Nothing here
knows any method's math.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from ..config import TASK_HEADS
from ..errors import ConfigError, MergeError, PatternWarning, TargetError
from ..registry import lookup, method_for
from .layer import AdapterLayer
from .merging import prepare_merge, untie_config
from .modules_to_save import ModulesToSaveWrapper
from .targets import find_targets, get_submodule_parent, logical_key, model_type_of, parameter_targets
from .tying import tie_config

if TYPE_CHECKING:
    from ..config import PeftConfig


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(key, layer) of every adapter layer of ``model`` (outer before inner)."""
    for key, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield key, module


def prepare_config(config: "PeftConfig", model: nn.Module) -> "PeftConfig":
    """Fill the fields a config takes from the model (default targets, task heads). Returns a copy."""
    config = copy.deepcopy(config)
    method = lookup(config.peft_type)
    if method is not None and method.prepare is not None:  # method-specific defaults (may set target_modules)
        method.prepare(config, model)
    own_targets = method is not None and method.find_targets is not None  # the method finds its targets
    if hasattr(config, "target_modules") and config.target_modules is None and not own_targets:
        method = method or method_for(config)  # raises a clear error for an unregistered method
        model_type = model_type_of(model)
        if model_type in method.default_targets:
            config.target_modules = set(method.default_targets[model_type])  # a set, as Hugging Face PEFT
        elif not getattr(config, "target_parameters", None):  # parameters only: stays None, as in HF PEFT
            raise ConfigError(
                f"Please specify `target_modules` in `peft_config`: target_modules is not set and peftkit has no "
                f"default for model type {model_type!r}; pass "
                "target_modules (module names, a regex, or 'all-linear')."
            )
    heads = TASK_HEADS.get(str(config.task_type)) if config.task_type else None
    if heads and hasattr(config, "modules_to_save"):
        present = [h for h in heads if any(k == h or k.endswith("." + h) for k, _ in model.named_modules())]
        if present:
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(present))
    if hasattr(config, "ensure_weight_tying"):
        tie_config(config, model)
    return config


def inject(model: nn.Module, config: "PeftConfig", adapter_name: str, *, targets: Optional[list[str]] = None) -> list[str]:
    """Wrap (or extend) every module ``config`` targets with an adapter ``adapter_name``.

    All-or-nothing: if creating any layer fails, every change made so far is undone before the
    error propagates. Returns the targeted keys.
    """
    method = method_for(config)
    if method.make_layer is None:
        raise TargetError(f"{config.peft_type} adapters are not layers; they cannot be injected into a model.")
    params_only = bool(getattr(config, "target_parameters", None)) and not getattr(config, "target_modules", None)
    if targets is not None:
        keys = targets
    elif params_only:
        keys = []
    elif method.find_targets is not None:  # methods that locate their targets themselves
        keys = method.find_targets(model, config)
    else:
        keys = find_targets(model, config)
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    extended: list[AdapterLayer] = []
    try:
        for key in keys:
            target = model.get_submodule(key)
            if isinstance(target, ModulesToSaveWrapper):
                raise TargetError(f"{key} is in modules_to_save of another adapter and cannot also be adapted.")
            if isinstance(target, AdapterLayer) and target.parameter_name is not None:
                raise TargetError(f"{key}: its parameter {target.parameter_name!r} is adapted through "
                                  "target_parameters by another adapter, so the module cannot also be targeted "
                                  "with target_modules.")
            if isinstance(target, AdapterLayer) and isinstance(target, method.layer_types):
                extended.append(target)  # first: a failing update_layer may have created some tensors
                target.update_layer(adapter_name, config, key)
                continue
            if isinstance(target, AdapterLayer) and not (target.stackable and stackable(method)):
                raise TargetError(
                    f"{key} already holds a {type(target).__name__} adapter; a {config.peft_type} adapter cannot be "
                    "added on the same module (only LoRA, IA3 and bottleneck layers stack on one module)."
                )
            new = method.make_layer(target, config, adapter_name, key)
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, new)
            replaced.append((parent, child, target))
        if targets is None and getattr(config, "target_parameters", None):
            keys = keys + parameters_or_warn(model, config, adapter_name, replaced, extended, bool(keys))
        if method.after_inject is not None:
            method.after_inject(model, config, adapter_name, keys)
        if targets is None:
            warn_unmatched_patterns(config, keys)
    except Exception:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        for parent, child, original in reversed(replaced):
            setattr(parent, child, original)
        raise
    return keys


def stackable(method: Any) -> bool:
    """Whether ``method``'s layers may wrap another method's layer (see ``AdapterLayer.stackable``)."""
    return all(getattr(t, "stackable", False) for t in method.layer_types)


def param_layer_for(module: nn.Module, param_name: str, key: str) -> Optional[AdapterLayer]:
    """The wrapper of parameter ``param_name`` in the chain of parameter wrappers ``module`` heads
    (None if the parameter is not wrapped yet); TargetError if a module wrapper is in the chain."""
    while isinstance(module, AdapterLayer):
        if module.parameter_name is None:
            raise TargetError(f"{key} is wrapped by a {type(module).__name__} adapter layer (target_modules), so its "
                              f"parameter {param_name!r} cannot also be targeted with target_parameters; target "
                              "either the module or its parameters.")
        if module.parameter_name == param_name:
            return module
        module = module.base_layer
    return None


def wrapped_parameters(model: nn.Module) -> set[tuple[str, str]]:
    """(module key, parameter name) of every parameter a parameter wrapper of ``model`` adapts."""
    return {(logical_key(key), layer.parameter_name) for key, layer in adapter_layers(model)
            if layer.parameter_name is not None and layer.adapter_names}


def warn_unmatched_patterns(config: "PeftConfig", keys: list[str]) -> None:
    """A warning naming the ``rank_pattern`` / ``alpha_pattern`` keys that match no targeted module
    (they were ignored; usually a typo), as Hugging Face PEFT."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None) or {}
        unmatched = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", k) for k in keys))
        if unmatched:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}. Check them against the module names.", PatternWarning, stacklevel=5)


def parameters_or_warn(model: nn.Module, config: "PeftConfig", adapter_name: str,
                       replaced: list[tuple[nn.Module, str, nn.Module]], extended: list[AdapterLayer],
                       modules_matched: bool) -> list[str]:
    """:func:`inject_parameters`; when no entry of ``target_parameters`` matches but ``target_modules``
    did, a warning (as Hugging Face PEFT) instead of the TargetError."""
    try:
        return inject_parameters(model, config, adapter_name, replaced, extended)
    except TargetError as exc:
        if not modules_matched or "matched any target_parameters entry" not in str(exc):
            raise
        warnings.warn(f"target_parameters={config.target_parameters!r} were set but no parameter was matched. ({exc})",
                      PatternWarning, stacklevel=5)
        return []


def inject_parameters(model: nn.Module, config: "PeftConfig", adapter_name: str,
                      replaced: list[tuple[nn.Module, str, nn.Module]], extended: list[AdapterLayer]) -> list[str]:
    """Wrap (or extend the wrapper of) every parameter ``config.target_parameters`` names; records the
    changes in ``replaced`` / ``extended`` for :func:`inject` to undo. Returns the parameter keys.

    All adapters that adapt parameters must adapt the same ones: which parameter a wrapper's tensors
    belong to is its place in the nesting, which a different set would change (and with it the
    checkpoint keys of the adapters already there), as in Hugging Face PEFT."""
    method = method_for(config)
    if method.make_param_layer is None:
        raise TargetError(f"{config.peft_type} adapters cannot target parameters (target_parameters).")
    pairs = parameter_targets(model, config)
    existing = wrapped_parameters(model)
    if existing and existing != set(pairs):
        raise TargetError(
            "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
            f"parameters; adapter {adapter_name!r} targets {sorted(f'{k}.{p}' for k, p in pairs)}, the adapters "
            f"already there {sorted(f'{k}.{p}' for k, p in existing)}.")
    for key, param_name in pairs:
        top = model.get_submodule(key)
        full = f"{key}.{param_name}"
        layer = param_layer_for(top, param_name, key)
        if layer is not None:
            extended.append(layer)
            layer.update_layer(adapter_name, config, full)
            continue
        new = method.make_param_layer(top, config, adapter_name, full, param_name)
        parent, child = get_submodule_parent(model, key)
        setattr(parent, child, new)
        replaced.append((parent, child, top))
    return [f"{k}.{p}" for k, p in pairs]


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop every tensor of adapter ``name``; wrappers left with no adapter give their place back to
    the module they wrap."""
    holding = [(key, layer) for key, layer in reversed(list(adapter_layers(model))) if name in layer.adapter_names]
    for _, layer in holding:  # innermost first; layers sharing tensors (tied embeddings) all see the deletion
        layer.delete_adapter(name)
    for key, layer in holding:
        if not layer.adapter_names:
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, layer.base_layer)


def check_mergeable(layers: Iterable[tuple[str, nn.Module]]) -> None:
    """MergeError (before anything changes) if any of ``(key, layer)`` holds a non-mergeable adapter."""
    for key, layer in layers:
        if not isinstance(layer, ModulesToSaveWrapper) and not layer.mergeable:
            raise MergeError(f"{key}: {type(layer).__name__} adapters cannot be merged; use unload() instead."
                             f"{layer.merge_hint}")


def unload(model: nn.Module, *, merge: bool, safe_merge: bool = False,
           adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace every wrapper by its base module, merging the active (or given) adapters first.

    Merging is all or nothing: every layer is checked before any changes (with ``safe_merge``, its
    merged weights too), and weights shared with other modules are untied first
    (:mod:`peftkit.core.merging`)."""
    layers = list(adapter_layers(model))
    if merge:
        check_mergeable(layers)
        prepare_merge(model, layers, adapter_names, safe_merge)
    # innermost first: a layer may hold another inside its base (LoRA on MHA; wrappers of parameters nest)
    for key, layer in reversed(layers):
        if isinstance(layer, ModulesToSaveWrapper):
            new = layer.unwrap(merge)
        else:
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            elif layer.merged:
                layer.unmerge()
            new = layer.get_base_layer()
        parent, child = get_submodule_parent(model, key)
        setattr(parent, child, new)
    if merge:
        untie_config(model)  # a trained copy of a tied head (modules_to_save) is its own tensor too
    return model


__all__ = ["adapter_layers", "check_mergeable", "inject", "inject_parameters", "param_layer_for", "prepare_config",
           "remove_adapter", "unload", "wrapped_parameters"]
