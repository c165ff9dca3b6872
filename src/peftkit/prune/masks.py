"""Pruning scores and masks: pure functions on tensors.

Shapes: a weight ``W`` is (out, in), the nn.Linear layout (a transformers ``Conv1D`` weight is
transposed to it by the caller). A mask has the shape of the scores it was computed from and is a
``torch.bool`` tensor, **True = kept**, False = pruned (set to zero).

Scores (higher = more important):

* magnitude: ``S_ij = |W_ij|``;
* Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models":
  Pruning by Weights and activations): ``S_ij = |W_ij| · ‖X_j‖₂``, where ``‖X_j‖₂ = sqrt(Σ_t x_tj²)``
  is the L2 norm of input feature ``j`` over all calibration tokens ``t`` (see
  :mod:`peftkit.prune.calibration`).

Masks at a sparsity ``s`` in [0, 1) prune ``k = ⌊s·n + ½⌋`` weights of each comparison group of
``n`` weights (``s·n`` rounded to the nearest integer, halves up), those with the lowest scores:

* per layer: the group is the whole layer (``n = out·in``);
* per row: each output row is a group (``n = in``): Wanda's comparison group;
* global: all the given layers together (``n = Σ numel``), so layers end up with different sparsities.

N:M semi-structured (``"2:4"``: 2 kept of every 4, NVIDIA's sparse tensor core convention): along the
input dimension, every group of ``M`` consecutive weights ``W_i,[gM, gM+M)`` keeps its ``N`` highest
scores; ``in`` must be divisible by ``M``. The sparsity is exactly ``1 - N/M``.

Ties are broken by position, deterministically: the weights of a group are ranked by descending
score, equal scores in row-major order (stable sort), and the last ``k`` of the ranking are pruned;
of two equal scores the one at the higher index is pruned first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..errors import ConfigError

NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` as a float in [0, 1); ConfigError otherwise (1 would remove every weight)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ConfigError("sparsity must be a number in [0, 1) (the fraction of weights set to zero), "
                          f"got {sparsity!r}.")
    value = float(sparsity)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ConfigError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}.")
    return value


def parse_nm(pattern: object) -> tuple[int, int]:
    """``"N:M"`` -> (N, M) with 0 < N < M; ConfigError otherwise."""
    match = NM_PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ConfigError(f"pattern must be a string 'N:M' (e.g. '2:4': at most 2 non-zeros in every 4 consecutive "
                          f"weights of a row), got {pattern!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r}: N:M needs 0 < N < M (N weights kept of every M), got N={n}, M={m}.")
    return n, m


def n_pruned(numel: int, sparsity: float) -> int:
    """The number of weights pruned from a group of ``numel`` at ``sparsity``: ``⌊s·n + ½⌋``."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32 (any shape)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| · ‖X_j‖₂`` in float32. ``weight`` (out, in), ``input_norms`` (in,)."""
    if weight.dim() != 2 or input_norms.shape != (weight.shape[1],):
        raise ConfigError(f"wanda_scores needs a weight (out, in) and input norms (in,), got {tuple(weight.shape)} "
                          f"and {tuple(input_norms.shape)}.")
    return weight.detach().abs().float() * input_norms.to(device=weight.device, dtype=torch.float32)[None, :]


def keep_top(scores: torch.Tensor, n_keep: int, dim: int = -1) -> torch.Tensor:
    """Bool mask keeping the ``n_keep`` highest scores along ``dim`` (ties: lower index kept)."""
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(dim, order.narrow(dim, 0, n_keep), True)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``⌊s·numel + ½⌋`` lowest scores of the whole tensor."""
    sparsity = check_sparsity(sparsity)
    flat = scores.reshape(-1)
    return keep_top(flat, flat.numel() - n_pruned(flat.numel(), sparsity)).reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``⌊s·in + ½⌋`` lowest scores of every row of ``scores`` (out, in)."""
    sparsity = check_sparsity(sparsity)
    if scores.dim() != 2:
        raise ConfigError(f"row_mask needs scores of shape (out, in), got {tuple(scores.shape)}.")
    width = scores.shape[1]
    return keep_top(scores, width - n_pruned(width, sparsity), dim=1)


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Prune the ``⌊s·Σnumel + ½⌋`` lowest scores over all the tensors of ``scores`` together (ranked
    on one device, in the mapping's order: ties across tensors prune the later tensor first)."""
    sparsity = check_sparsity(sparsity)
    if not scores:
        raise ConfigError("global_masks needs at least one tensor of scores.")
    device = next(iter(scores.values())).device
    flat = torch.cat([s.reshape(-1).to(device=device, dtype=torch.float32) for s in scores.values()])
    keep = keep_top(flat, flat.numel() - n_pruned(flat.numel(), sparsity))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of ``scores`` (out, in)."""
    if scores.dim() != 2:
        raise ConfigError(f"nm_mask needs scores of shape (out, in), got {tuple(scores.shape)}.")
    if not 0 < n < m:
        raise ConfigError(f"N:M needs 0 < N < M, got N={n}, M={m}.")
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"N:M sparsity with M={m} needs in_features divisible by {m}, got {in_f}.")
    groups = scores.reshape(out_f, in_f // m, m)
    return keep_top(groups, n, dim=2).reshape(out_f, in_f)


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``mask`` (out, in) keeps at most ``n`` of every ``m`` consecutive entries of each row."""
    out_f, in_f = mask.shape
    return in_f % m == 0 and bool((mask.reshape(out_f, in_f // m, m).sum(-1) <= n).all())


__all__ = [
    "check_nm",
    "check_sparsity",
    "global_masks",
    "keep_top",
    "layer_mask",
    "magnitude_scores",
    "n_pruned",
    "nm_mask",
    "parse_nm",
    "row_mask",
    "wanda_scores",
]
