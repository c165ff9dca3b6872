"""Unstructured and N:M pruning of a model's linear layers, in place: magnitude and Wanda.

:func:`prune_model` scores every weight of the target layers (magnitude ``|W_ij|`` or Wanda
``|W_ij| · ‖X_j‖₂``, see :mod:`peftkit.prune.masks`), builds a keep-mask per layer (per layer, per
output row, over all layers together, or N:M along the input dimension) and sets the pruned weights
to zero. The result is an ordinary model whose weights hold zeros (no reparametrization, no hooks
left behind, parameters keep their identity and order); the masks are returned so that later steps
(masked fine-tuning, a sparse merge) can keep the zeros.

Every argument, target and calibration input is checked before the first weight changes: on an error
the model is bit-identical to what it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from .._io import load_tensors, save_tensors
from ..errors import CheckpointError, ConfigError, closest
from .calibration import Batch, target_input_norms
from .masks import check_sparsity, global_masks, layer_mask, magnitude_scores, nm_mask, parse_nm, row_mask, wanda_scores
from .targets import DEFAULT_EXCLUDE, Names, base_of, in_features, is_prunable, prune_targets, to_stored, weight_oi

METHODS = ("magnitude", "wanda")
SCOPES = ("layer", "row", "global")
DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "row"}

Calibration = Union[Mapping[str, torch.Tensor], Iterable[Batch]]


@dataclass(frozen=True)
class LayerSparsity:
    """One layer of a sparsity report: its weight's shape, number of weights, zeros, and zeros / numel."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    sparsity: float

    @property
    def nonzeros(self) -> int:
        return self.numel - self.zeros


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer rows and the totals over those layers."""

    layers: list[LayerSparsity]
    numel: int
    zeros: int
    sparsity: float

    @property
    def nonzeros(self) -> int:
        return self.numel - self.zeros

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'params':>10}  {'non-zeros':>10}  sparsity"]
        for r in self.layers:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(f"{r.name:<{width}}  {shape:>12}  {r.numel:>10}  {r.nonzeros:>10}  {r.sparsity:8.2%}")
        lines.append(f"{'total':<{width}}  {'':>12}  {self.numel:>10}  {self.nonzeros:>10}  {self.sparsity:8.2%}")
        return "\n".join(lines)


@dataclass
class PruneResult:
    """What :func:`prune_model` did: the keep-masks (module name -> bool tensor of the stored weight's
    shape, True = kept; on the weight's device), the sparsity report of the pruned layers, and the
    settings (``sparsity`` is ``1 - N/M`` for an N:M ``pattern``; ``scope`` is None then)."""

    masks: dict[str, torch.Tensor]
    report: SparsityReport
    method: str
    sparsity: float
    pattern: Optional[str] = None
    scope: Optional[str] = None


def _check_settings(method: Any, sparsity: Any, pattern: Any,
                    scope: Any) -> tuple[str, float, Optional[tuple[int, int]], Optional[str]]:
    """(method, sparsity, (N, M) or None, scope or None), checked; ConfigError otherwise."""
    if method not in METHODS:
        hint = closest(str(method), METHODS, n=1) if isinstance(method, str) else []
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}."
                          + (f" Did you mean {hint[0]!r}?" if hint else ""))
    if pattern is not None:
        n, m = parse_nm(pattern)
        if scope is not None:
            raise ConfigError(f"scope={scope!r} does not apply to an N:M pattern (its groups are {m} consecutive "
                              "weights of a row); leave scope unset.")
        if sparsity is not None and abs(check_sparsity(sparsity) - (1 - n / m)) > 1e-9:
            raise ConfigError(f"pattern {pattern!r} prunes exactly {1 - n / m:g} of the weights; sparsity={sparsity!r} "
                              "contradicts it (leave sparsity unset with a pattern).")
        return method, 1 - n / m, (n, m), None
    sparsity = check_sparsity(0.5 if sparsity is None else sparsity)
    scope = DEFAULT_SCOPE[method] if scope is None else scope
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES} (the group the lowest scores are pruned from), "
                          f"got {scope!r}.")
    return method, sparsity, None, scope


def _check_norms(norms: Mapping[str, Any], targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Precomputed input norms cover every target with a finite, non-negative (in,) vector."""
    missing = [k for k in targets if k not in norms]
    if missing:
        raise ConfigError(f"calibration holds no input norms for {missing[0]} ({len(missing)} target(s) missing); pass "
                          "the norms of collect_input_norms() for the same targets, or calibration batches.")
    out = {}
    for key, module in targets.items():
        value = norms[key]
        width = in_features(module)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (width,):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"calibration norms of {key} must be a tensor of shape ({width},), got {got}.")
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ConfigError(f"calibration norms of {key} must be finite and non-negative.")
        out[key] = value
    return out


def _scores(method: str, targets: dict[str, nn.Module],
            norms: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(out, in) float32 scores per target; ConfigError for a non-finite weight."""
    scores = {}
    for key, module in targets.items():
        weight = weight_oi(module)
        if not torch.isfinite(weight).all():
            raise ConfigError(f"{key} has non-finite weights (NaN or inf); scores would be meaningless.")
        scores[key] = magnitude_scores(weight) if method == "magnitude" else wanda_scores(weight, norms[key])
    return scores


def _masks(scores: dict[str, torch.Tensor], sparsity: float, nm: Optional[tuple[int, int]],
           scope: Optional[str]) -> dict[str, torch.Tensor]:
    if nm is not None:
        return {k: nm_mask(s, *nm) for k, s in scores.items()}
    if scope == "global":
        return global_masks(scores, sparsity)
    make = layer_mask if scope == "layer" else row_mask
    return {k: make(s, sparsity) for k, s in scores.items()}


def _wanda_norms(model: nn.Module, targets: dict[str, nn.Module], calibration: Any) -> dict[str, torch.Tensor]:
    """The input norms of every target: checked if given (a dict keyed by layer name), else collected."""
    if calibration is None:
        raise ConfigError("method='wanda' needs calibration: batches of inputs (calibration_batches(tokenizer, "
                          "texts)) or the norms of collect_input_norms(model, batches).")
    if isinstance(calibration, Mapping):
        if not any(k in calibration for k in targets):
            raise ConfigError("calibration is a dict whose keys are no target layer names: pass a list of batches "
                              "(e.g. [batch]) or the norms returned by collect_input_norms().")
        return _check_norms(calibration, targets)
    if isinstance(calibration, (str, bytes, torch.Tensor)):
        raise ConfigError(f"calibration must be an iterable of batches (dicts of tensors) or input norms, got a "
                          f"{type(calibration).__name__}.")
    return target_input_norms(model, targets, calibration)


def prune_model(model: nn.Module, method: str = "magnitude", sparsity: Optional[float] = None, *,
                pattern: Optional[str] = None, scope: Optional[str] = None,
                calibration: Optional[Calibration] = None, target_modules: Names = None,
                exclude: Names = DEFAULT_EXCLUDE) -> PruneResult:
    """Prune the linear layers of ``model`` in place; returns the masks and a report.

    Args:
        method: ``"magnitude"`` (score ``|W_ij|``) or ``"wanda"`` (``|W_ij| · ‖X_j‖₂``; needs ``calibration``).
        sparsity: fraction of weights set to zero, in [0, 1) (default 0.5). Each comparison group of
            ``n`` weights loses ``⌊s·n + ½⌋`` of them.
        pattern: ``"N:M"`` (e.g. ``"2:4"``): at most N non-zeros in every M consecutive weights along
            the input dimension; the sparsity is then ``1 - N/M`` (leave ``sparsity`` unset).
        scope: the comparison group: ``"layer"`` (default for magnitude), ``"row"`` (each output row;
            default for Wanda) or ``"global"`` (all target layers together).
        calibration: for Wanda, an iterable of batches (dicts the model's forward accepts, e.g. from
            :func:`~peftkit.prune.calibration_batches`) or the norms of
            :func:`~peftkit.prune.collect_input_norms`.
        target_modules: None (every nn.Linear / Conv1D but the output head), a list of module names
            (dotted suffixes) or a regex, as peftkit's LoRA targets.
        exclude: names or a regex never pruned (default: the task heads of ``DEFAULT_EXCLUDE``).

    Everything is checked before the first weight changes (ConfigError, TargetError); on an error
    the model is unchanged.
    """
    method, sparsity, nm, scope = _check_settings(method, sparsity, pattern, scope)
    targets = prune_targets(model, target_modules, exclude)
    if nm is not None:
        odd = [(k, in_features(m)) for k, m in targets.items() if in_features(m) % nm[1]]
        if odd:
            raise ConfigError(f"pattern {pattern!r} needs in_features divisible by {nm[1]}; {odd[0][0]} has "
                              f"{odd[0][1]} ({len(odd)} layer(s) do not fit). Leave them out with exclude=.")
    norms = _wanda_norms(model, targets, calibration) if method == "wanda" else None
    if method != "wanda" and calibration is not None:
        raise ConfigError("calibration is only used by method='wanda'; magnitude pruning needs none.")
    masks = _masks(_scores(method, targets, norms), sparsity, nm, scope)
    stored = {key: to_stored(masks[key], module) for key, module in targets.items()}
    _apply(targets, stored)
    return PruneResult(masks=stored, report=_report(targets, stored), method=method, sparsity=sparsity,
                       pattern=None if nm is None else f"{nm[0]}:{nm[1]}", scope=scope)


def _apply(targets: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights where the mask is False (in place, under no_grad: the Parameter objects stay)."""
    with torch.no_grad():
        for key, module in targets.items():
            module.weight.masked_fill_(~masks[key].to(module.weight.device), 0)


def _report(targets: dict[str, nn.Module], masks: Optional[Mapping[str, torch.Tensor]] = None) -> SparsityReport:
    rows = []
    for key, module in targets.items():
        weight = module.weight.detach()
        zeros = int((weight == 0).sum())
        rows.append(LayerSparsity(key, tuple(weight.shape), weight.numel(), zeros, zeros / max(weight.numel(), 1)))
    numel = sum(r.numel for r in rows)
    zeros = sum(r.zeros for r in rows)
    return SparsityReport(rows, numel, zeros, zeros / max(numel, 1))


def _mask_targets(model: nn.Module, masks: Any) -> dict[str, nn.Module]:
    """{name: layer} for every entry of ``masks``, checked: a prunable layer of the model, a bool mask of
    its stored weight's shape. ConfigError otherwise."""
    if not isinstance(masks, Mapping) or not masks:
        raise ConfigError("masks must be a non-empty dict {module name: bool tensor} (as PruneResult.masks).")
    names = {k for k, _ in model.named_modules() if k}
    targets = {}
    for key, mask in masks.items():
        if not isinstance(key, str) or key not in names:
            hints = closest(str(key), names, n=3)
            raise ConfigError(f"masks name {key!r}, which is no module of the model."
                              + (f" Closest module names: {', '.join(hints)}." if hints else ""))
        module = base_of(model.get_submodule(key))
        if not is_prunable(module):
            raise ConfigError(f"{key} is a {type(module).__name__}; masks apply to nn.Linear / Conv1D weights.")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigError(f"The mask of {key} must be a torch.bool tensor (True = kept), got {got}.")
        if mask.shape != module.weight.shape:
            raise ConfigError(f"The mask of {key} has shape {tuple(mask.shape)}, its weight "
                              f"{tuple(module.weight.shape)}.")
        targets[key] = module
    return targets


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> SparsityReport:
    """Zero the weights of ``model`` where ``masks`` is False (in place); returns the sparsity report of
    the masked layers. Every name and shape is checked first (ConfigError; the model unchanged)."""
    targets = _mask_targets(model, masks)
    _apply(targets, dict(masks))
    return _report(targets)


def sparsity_report(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None) -> SparsityReport:
    """Zeros per layer and in total, counted in the model's current weights: of the layers named in
    ``masks``, or (None) of the layers :func:`prune_model` targets by default."""
    return _report(prune_targets(model) if masks is None else _mask_targets(model, masks))


def save_masks(masks: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write ``masks`` to a safetensors file (bool stored as uint8 0/1; atomic write)."""
    if not os.fspath(path).endswith(".safetensors"):
        raise ConfigError(f"Masks are saved as safetensors: name the file *.safetensors, got {os.fspath(path)!r}.")
    if not isinstance(masks, Mapping) or not masks:
        raise ConfigError("masks must be a non-empty dict {module name: bool tensor} (as PruneResult.masks).")
    bad = [k for k, v in masks.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.dtype != torch.bool]
    if bad:
        raise ConfigError(f"masks must map module names to torch.bool tensors; {bad[0]!r} does not.")
    save_tensors({k: v.to(torch.uint8) for k, v in masks.items()}, path, metadata={"peftkit": "prune masks"})


def load_masks(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks` (CPU bool tensors); CheckpointError if the file is
    missing, corrupt, or holds anything but 0/1 uint8 tensors."""
    if not os.fspath(path).endswith(".safetensors"):
        raise ConfigError(f"Mask files are safetensors (*.safetensors), got {os.fspath(path)!r}.")
    tensors = load_tensors(path)
    for key, value in tensors.items():
        if value.dtype != torch.uint8 or bool((value > 1).any()):
            raise CheckpointError(f"{os.fspath(path)} is no mask file: {key} is not a 0/1 uint8 tensor.")
    return {k: v.bool() for k, v in tensors.items()}


__all__ = ["DEFAULT_EXCLUDE", "LayerSparsity", "METHODS", "PruneResult", "SCOPES", "SparsityReport", "apply_masks",
           "load_masks", "prune_model", "save_masks", "sparsity_report"]
