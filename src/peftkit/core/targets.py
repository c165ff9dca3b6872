"""Target matching: which modules of a model a config targets, and the hints when none match.

``target_modules`` is a list (exact module name or dotted suffix), a regex string (full match) or
``"all-linear"`` (every linear layer but the output head); ``exclude_modules`` takes the same forms;
``layers_to_transform`` / ``layers_pattern`` keep only some block indices; modules in
``modules_to_save`` are never targets. Walks skip the insides of adapter layers
(:func:`outer_modules`), so a wrapped model matches like the original.

``target_parameters`` names parameters (``experts.gate_up_proj``: exact, or a dotted suffix of
``<module key>.<parameter name>``); :func:`parameter_targets` finds them on the model as it was
before any wrapping (:func:`base_modules`), parameters under a ``torch.nn.utils.parametrize``
parametrization included.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from torch import nn
from torch.nn.utils import parametrize

from ..errors import PeftkitWarning, TargetError, closest
from .layer import AdapterLayer

if TYPE_CHECKING:
    from ..config import PeftConfig

# Layer name patterns used by ``layers_to_transform`` when ``layers_pattern`` is not given.
DEFAULT_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")
# The regex a ``layers_pattern`` entry goes into ("{}"), finding the block index after it.
LAYER_INDEX_REGEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."


def model_type_of(model: nn.Module) -> Optional[str]:
    """The transformers ``config.model_type`` of ``model`` (None for a plain nn.Module)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    """The block index in ``key`` (``model.layers.3.mlp`` -> 3) after one of ``layers_pattern``, or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(m.group("idx")) if m else None
    for pattern in patterns:
        m = re.match(LAYER_INDEX_REGEX.replace("{}", pattern), key)
        if m:
            return int(m.group("idx"))
    return None


def matches_names(key: str, names: Any) -> bool:
    """``names`` a regex string (full match) or a list of names (exact, or a dotted suffix of ``key``)."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def excluded(config: "PeftConfig", key: str) -> bool:
    """Whether ``exclude_modules`` names module ``key``."""
    exclude = getattr(config, "exclude_modules", None)
    return bool(exclude) and matches_names(key, exclude)


def in_modules_to_save(config: "PeftConfig", key: str) -> bool:
    """Whether module ``key`` is (inside) one of ``modules_to_save``: never an adapter target."""
    names = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in names)


def closest_module_names(model: nn.Module, targets: Any) -> list[str]:
    """Module names of ``model`` nearest to the wanted ``targets`` (a name or a list), for error hints."""
    names = [k for k, _ in outer_modules(model) if k]
    want = [targets] if isinstance(targets, str) else list(targets or [])
    hints: list[str] = []
    for t in want:
        hints += closest(t, names, n=5)
    return list(dict.fromkeys(hints))


def is_target(config: "PeftConfig", key: str, module: nn.Module, all_linear: Optional[set[str]] = None) -> bool:
    """Whether module ``key`` is targeted by ``config`` (target_modules, exclude_modules, layer filters)."""
    if excluded(config, key) or in_modules_to_save(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if targets == "all-linear":
        found = all_linear is not None and key in all_linear
    else:
        found = matches_names(key, targets)
    if not found:
        return False
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is not None and not (isinstance(indexes, list) and len(indexes) == 0):
        idx = layer_index(key, getattr(config, "layers_pattern", None) or DEFAULT_LAYERS_PATTERN)
        if idx is None:
            return False
        wanted = [indexes] if isinstance(indexes, int) else indexes
        return idx in wanted
    return True


def check_target_module_exists(config: "PeftConfig", key: str) -> bool:
    """Whether module ``key`` would be targeted by ``config`` by its name alone (Hugging Face PEFT's
    helper; ``"all-linear"`` needs the model, so it answers False here)."""
    if getattr(config, "target_modules", None) == "all-linear":
        return False
    return is_target(config, key, nn.Identity())


def linear_module_names(model: nn.Module) -> set[str]:
    """Every linear layer (nn.Linear, transformers Conv1D, quantized linears) except the output head."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for key, module in outer_modules(model):
        if isinstance(module, AdapterLayer):
            module = module.get_base_layer()
        if isinstance(module, (nn.Linear, Conv1D)) or getattr(module, "is_quantized_linear", False):
            names.add(key)
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    for key, module in model.named_modules():
        if head is not None and module is head:
            names.discard(key)
    return {n for n in names if not n.endswith(("lm_head", "output_layer", "embed_out"))}


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of adapter layers (their base layers and adapter tensors)."""
    inside: Optional[str] = None
    for key, module in model.named_modules():
        if inside is not None and key.startswith(inside):
            continue
        inside = None
        yield key, module
        if isinstance(module, AdapterLayer):
            inside = key + "." if key else ""


def find_targets(model: nn.Module, config: "PeftConfig") -> list[str]:
    """The keys of the modules ``config`` targets; raises TargetError listing close names if none."""
    all_linear = linear_module_names(model) if config.target_modules == "all-linear" else None
    keys, dropped = [], []
    for key, module in outer_modules(model):
        if not key:
            continue
        if is_target(config, key, module, all_linear):
            keys.append(key)
        elif excluded(config, key):
            dropped.append(key)
    exclude = getattr(config, "exclude_modules", None)
    if not keys and dropped:
        every = [k for k, _ in outer_modules(model) if k]
        head = "All modules were excluded" if len(dropped) == len(every) else "No modules were targeted for adaptation"
        raise TargetError(f"{head}: target_modules={config.target_modules!r} matched only modules that "
                          f"exclude_modules={exclude!r} excludes (e.g. {dropped[0]}).")
    if not keys:
        raise TargetError(no_match_message(model, config))
    if exclude and not dropped:
        warnings.warn(f"You have passed exclude_modules={exclude!r} but no modules were excluded. Please check that "
                      "exclude_modules was set correctly.", PeftkitWarning, stacklevel=4)
    return keys


def no_match_message(model: nn.Module, config: "PeftConfig") -> str:
    targets = config.target_modules
    hints = closest_module_names(model, targets)
    leafs = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules() if k and not list(m.children())})
    msg = f"Target modules {targets} not found in the base model: no module of the model matched target_modules={targets!r}"
    if getattr(config, "layers_to_transform", None) is not None:
        msg += f" with layers_to_transform={config.layers_to_transform!r}"
    msg += "."
    if hints:
        msg += f" Closest module names: {', '.join(hints)}."
    msg += f" Leaf module names in this model: {', '.join(leafs[:30])}{' ...' if len(leafs) > 30 else ''}."
    return msg


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(key, module) of the model as it was before wrapping: an adapter layer stands for its innermost
    base module, under the wrapper's key; adapter tensors and parametrization containers are not
    visited. Each module once."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        key, module = stack.pop()
        if isinstance(module, AdapterLayer):
            module = module.get_base_layer()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield key, module
        children = [(f"{key}.{name}" if key else name, child) for name, child in module.named_children()
                    if not (name == "parametrizations" and parametrize.is_parametrized(module))]
        stack.extend(reversed(children))


def own_parameter_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s own parameters (registration order), then those it holds under a
    parametrization (read through it as ``module.<name>``)."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if parametrize.is_parametrized(module):
        names += [name for name in module.parametrizations.keys() if name not in names]
    return names


def logical_key(key: str) -> str:
    """A module key with the ``base_layer`` steps of wrappers removed (``experts.base_layer`` -> ``experts``)."""
    return ".".join(part for part in key.split(".") if part != "base_layer")


def parameter_targets(model: nn.Module, config: "PeftConfig") -> list[tuple[str, str]]:
    """(module key, parameter name) of every parameter ``config.target_parameters`` names, modules in
    walk order and each module's parameters in registration order (the order Hugging Face PEFT nests
    its wrappers in). TargetError for a name that matches no parameter (with the closest parameter
    names) and for parameters of the top-level module (a wrapper cannot replace the model itself)."""
    wanted = list(getattr(config, "target_parameters", None) or [])
    found: list[tuple[str, str]] = []
    used: set[str] = set()
    every: list[str] = []
    for key, module in base_modules(model):
        for name in own_parameter_names(module):
            full = f"{key}.{name}" if key else name
            every.append(full)
            hits = [t for t in wanted if full == t or full.endswith("." + t)]
            if not hits:
                continue
            if not key:
                raise TargetError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                                  f"{name!r}): it has no parent module to hold its wrapper. Wrap the model in a "
                                  "module that holds it as a submodule.")
            used.update(hits)
            found.append((key, name))
    missing = [t for t in wanted if t not in used]
    if missing:
        hints = list(dict.fromkeys(h for t in missing for h in closest(t, every, n=5)))
        if not used:
            msg = (f"No parameter of the model matched any target_parameters entry ({wanted})."
                   + ("" if getattr(config, "target_modules", None) else " No `target_modules` passed but also no "
                      "`target_parameters` found. Please check the values for these arguments."))
        else:
            msg = f"No parameter of the model matched target_parameters entry {missing[0]!r}"
            msg += f" (unmatched: {missing})." if len(missing) > 1 else "."
        if hints:
            msg += f" Closest parameter names: {', '.join(hints[:8])}."
        raise TargetError(msg + " Entries are full parameter names or dotted suffixes of them, e.g. "
                          "'mlp.experts.gate_up_proj'; regexes are not supported.")
    return found


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule ``key``."""
    parent_key, _, child = key.rpartition(".")
    return (model.get_submodule(parent_key) if parent_key else model), child


def outermost(keys: list[str]) -> list[str]:
    """Drop duplicates and keys nested inside another key (a wrapped module cannot be wrapped again inside)."""
    out: list[str] = []
    for key in sorted(dict.fromkeys(keys), key=lambda k: (k.count("."), k)):
        if not any(key.startswith(k + ".") for k in out):
            out.append(key)
    order = {k: i for i, k in enumerate(keys)}
    return sorted(out, key=lambda k: order[k])


def no_match(model: nn.Module, what: str, targets: Any) -> str:
    """The TargetError message for a field (``what``) whose module names matched nothing."""
    hints = closest_module_names(model, targets)
    msg = f"No module of the model matched {what}={targets!r}."
    if hints:
        msg += f" Closest module names: {', '.join(hints)}."
    return msg


__all__ = ["DEFAULT_LAYERS_PATTERN", "LAYER_INDEX_REGEX", "base_modules", "check_target_module_exists", "closest_module_names", "excluded",
           "find_targets", "get_submodule_parent", "in_modules_to_save", "is_target", "layer_index",
           "linear_module_names", "logical_key", "matches_names", "model_type_of", "no_match", "no_match_message",
           "outer_modules", "outermost", "own_parameter_names", "parameter_targets"]
