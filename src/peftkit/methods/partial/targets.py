"""Partial fine-tuning's targets: the last N blocks of each transformer block list, and named modules."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...core.layer import AdapterLayer
from ...core.targets import (
    DEFAULT_LAYERS_PATTERN,
    excluded,
    in_modules_to_save,
    matches_names,
    no_match,
    outer_modules,
    outermost,
)
from ...errors import TargetError
from .config import PartialConfig
from .layer import PartialLayer


def block_lists(model: nn.Module, layers_pattern: Any = None) -> list[tuple[str, nn.ModuleList]]:
    """The outermost non-empty ``nn.ModuleList``\\ s named by ``layers_pattern`` (the transformer block lists)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or DEFAULT_LAYERS_PATTERN)
    found: list[tuple[str, nn.ModuleList]] = []
    for key, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or key.rsplit(".", 1)[-1] not in patterns:
            continue
        if any(key.startswith(k + ".") for k, _ in found):
            continue
        found.append((key, module))
    return found


def find_partial_targets(model: nn.Module, config: PartialConfig) -> list[str]:
    keys: list[str] = []
    if config.num_last_layers is not None:
        stacks = block_lists(model, config.layers_pattern)
        if not stacks:
            pattern = config.layers_pattern or list(DEFAULT_LAYERS_PATTERN)
            raise TargetError(
                f"PartialConfig.num_last_layers: the model has no list of transformer blocks (an nn.ModuleList named "
                f"{pattern}); set layers_pattern to the name of its block list, or select modules with target_modules."
            )
        n = config.num_last_layers
        for key, blocks in stacks:
            if n > len(blocks):
                raise TargetError(
                    f"PartialConfig.num_last_layers={n} but {key} has only {len(blocks)} blocks; use at most {len(blocks)}."
                )
            keys += [f"{key}.{i}" for i in range(len(blocks) - n, len(blocks))]
    if config.target_modules is not None:
        matched = [k for k, _ in outer_modules(model) if k and matches_names(k, config.target_modules)]
        if not matched:
            raise TargetError(no_match(model, "target_modules", config.target_modules))
        keys += matched
    keys = [k for k in keys if not excluded(config, k) and not in_modules_to_save(config, k)]
    keys = outermost(keys)
    if not keys:
        raise TargetError("PartialConfig selects no module (everything it matched is excluded or in modules_to_save).")
    for key in keys:
        module = model.get_submodule(key)
        inner = [k for k, m in module.named_modules() if k and isinstance(m, AdapterLayer)]
        if inner and not isinstance(module, PartialLayer):
            raise TargetError(
                f"{key} contains adapter layers of another adapter ({key}.{inner[0]}); partial fine-tuning copies whole "
                "modules and cannot be combined with other adapters inside them."
            )
    return keys


__all__ = ["block_lists", "find_partial_targets"]
