"""Batched kernels of mixed-adapter batches, shared by the methods (row-wise dropout, LoRA-shaped
batched matmuls over stacked per-adapter weights). A leaf of the engine.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mixed import RowPlan


def batched_lora(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, plan: RowPlan,
                 add_to: Optional[torch.Tensor] = None, in_place: bool = False) -> torch.Tensor:
    """Row i of ``x3`` (rows, tokens, in) times ``A[idx[i]]`` (in, r) times ``B[idx[i]]`` (r, out),
    plus ``add_to`` (rows, tokens, out) when given (added in the same batched matmul; into
    ``add_to`` itself when ``in_place`` and no gradient is recorded).

    Four equivalent ways, none copying the stacked weights per row unless it must: a batched
    matmul on a slice of the stacks (rows use consecutive slots in order: no copy); on a CPU, for one
    token a row (a decode step) when many rows share few adapters, a batched matmul over the rows laid
    out as one padded group per adapter (the CPU's ``grouped_mm`` runs one small product per group:
    at 256 rows over 32 adapters a quarter of the decode step); a grouped matmul over tokens sorted by
    adapter when many rows share few adapters (inference; its cost grows with the number of adapters,
    so it loses to the next one when most rows have their own); a batched matmul on gathered weights
    (any assignment, and training).
    """
    rows, tokens, d_in = x3.shape
    grad = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x3.requires_grad
                                        or (add_to is not None and add_to.requires_grad))
    copy = grad or not in_place  # add out of place
    if plan.start is not None:
        return bmm_pair(x3, A.narrow(0, plan.start, rows), B.narrow(0, plan.start, rows), add_to, copy)
    if not grad and plan.n_slots_used * 4 <= rows:  # many rows share few adapters
        one_token_on_cpu = tokens == 1 and x3.device.type == "cpu"
        out = padded_group_lora(x3.reshape(rows, d_in), A, B, plan) if one_token_on_cpu else None
        if out is None and (hasattr(F, "grouped_mm") and x3.dtype in (torch.float32, torch.bfloat16)
                            and d_in % 8 == 0 and B.shape[-1] % 8 == 0):
            out = grouped_lora(x3.reshape(rows * tokens, d_in), A, B, plan.groups(tokens, A.shape[0]))
        if out is not None:
            out = out.view(rows, tokens, -1)
            return out if add_to is None else (add_to + out if copy else add_to.add_(out))
    return bmm_pair(x3, A.index_select(0, plan.idx), B.index_select(0, plan.idx), add_to, copy)


def grouped_lora(flat: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 groups: tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
    """Token t of ``flat`` (tokens, in) times its slot's ``A`` and ``B`` as two grouped matmuls over the
    tokens sorted by slot (``groups``: :meth:`RowPlan.groups`, the offsets and the sorting order)."""
    offs, order = groups
    if order is not None:
        flat = flat.index_select(0, order)
    out = F.grouped_mm(F.grouped_mm(flat, A, offs=offs), B, offs=offs)
    return out if order is None else torch.empty_like(out).index_copy_(0, order, out)


def padded_group_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, plan: RowPlan) -> Optional[torch.Tensor]:
    """Row i of ``x`` (rows, in) times ``A[idx[i]] B[idx[i]]`` as two batched matmuls over G groups of m
    places (:meth:`RowPlan.padded_groups`; empty places read a zero row), or None when the padding would
    exceed 3 places in 4 (one adapter holding most rows)."""
    slots, first, m, gather, place = plan.padded_groups()
    G, rows = slots.numel(), x.shape[0]
    if G * m > 4 * rows:
        return None
    a = A.narrow(0, first, G) if first is not None else A.index_select(0, slots)
    b = B.narrow(0, first, G) if first is not None else B.index_select(0, slots)
    grouped = F.pad(x, (0, 0, 0, 1)).index_select(0, gather).view(G, m, -1)
    return torch.bmm(torch.bmm(grouped, a), b).view(G * m, -1).index_select(0, place)


def bmm_pair(x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add_to: Optional[torch.Tensor],
             copy: bool) -> torch.Tensor:
    """``(x3 @ a) @ b`` (+ ``add_to``, fused into the second batched matmul; into ``add_to`` itself
    unless ``copy``)."""
    h = torch.bmm(x3, a)
    if add_to is None:
        return torch.bmm(h, b)
    return torch.baddbmm(add_to, h, b) if copy else add_to.baddbmm_(h, b)


def dropout_p(module: nn.Module) -> float:
    """The drop probability of a dropout module (0 for ``nn.Identity`` and anything else)."""
    return module.p if isinstance(module, nn.Dropout) else 0.0


def rowwise_dropout(x: torch.Tensor, ps: list[float], idx: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with each row's own probability (x: (batch, ...))."""
    if not any(p > 0 for p in ps):
        return x
    p = torch.tensor(ps, device=x.device, dtype=x.dtype).index_select(0, idx)
    p = p.view(-1, *([1] * (x.dim() - 1)))
    keep = torch.rand_like(x) >= p
    return x * keep / (1 - p)


__all__ = ["batched_lora", "bmm_pair", "dropout_p", "grouped_lora", "padded_group_lora", "rowwise_dropout"]
