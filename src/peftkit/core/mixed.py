"""Mixed-adapter batches: which adapter each row of a batch uses, and how layers find out.

``PeftModel.forward(..., adapter_names=[...])`` opens a :class:`mixed_batch` around the model call;
every adapter layer reads it with :func:`current_mixed_batch` and routes row ``i`` through adapter
``names[i]`` (``"__base__"``: none). Layers turn the names into an index into their own stacked
adapter weights (:meth:`MixedBatch.index`, :meth:`MixedBatch.plan`); :mod:`peftkit.core.kernels` holds
the batched matmuls that use them. A leaf of the engine (imports only errors).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import AdapterNameError, PeftkitError

BASE_ADAPTER = "__base__"  # row name for "no adapter" in mixed batches


@dataclass
class MixedBatch:
    """Which adapter each row of the current batch uses (set by ``PeftModel.forward(adapter_names=...)``).

    Layers turn the names into an index into their own stacked adapter weights with :meth:`index`;
    the result is cached per adapter order so that a forward computes it once per distinct order.
    ``expand``: the rows may be a multiple of the names, row ``i`` of the caller's batch becoming
    rows ``i*k .. i*k+k-1`` (``generate()`` expands rows for beams / ``num_return_sequences``); in a
    plain forward every layer must see exactly one row per name. ``static``: the caller promises that
    no adapter weight changes in place while it runs such batches (a server between installs), so
    layers may reuse what they built from the weights without re-checking them each forward.
    """

    names: tuple[str, ...]
    expand: bool = False
    static: bool = False
    _cache: dict = field(default_factory=dict)

    def index(self, slots: tuple[str, ...], device: torch.device, batch: int) -> torch.Tensor:
        """Row -> slot index, slot 0 being "no adapter"; ``slots`` are a layer's adapters in order."""
        key = (slots, device)
        idx = self._cache.get(key)
        if idx is None:
            pos = {name: i + 1 for i, name in enumerate(slots)}
            idx = torch.tensor([pos.get(n, 0) for n in self.names], dtype=torch.long, device=device)
            self._cache[key] = idx
        if batch != idx.numel():
            if not self.expand or batch % idx.numel():
                raise PeftkitError(
                    f"adapter_names has {idx.numel()} entries but the batch has {batch} rows; give one name per row."
                )
            # generate() expands rows for beams / num_return_sequences: row i -> rows i*k..i*k+k-1
            idx = idx.repeat_interleave(batch // idx.numel())
        return idx

    def plan(self, slots: tuple[str, ...], device: torch.device, batch: int) -> "RowPlan":
        """The row -> slot index with what layers need to avoid copying weights (cached like :meth:`index`)."""
        key = ("plan", slots, device, batch)
        plan = self._cache.get(key)
        if plan is None:
            plan = RowPlan(self.index(slots, device, batch))
            self._cache[key] = plan
        return plan


class RowPlan:
    """A batch's slot per row, and the groupings layers use for batched adapter matmuls.

    ``start``: when rows use consecutive slots ``start, start+1, ...`` in order (each row its own
    adapter, in slot order), layers can slice their stacked weights instead of gathering them.
    ``n_slots_used``: distinct slots among the rows. :meth:`groups` sorts tokens by slot for grouped
    matmuls (``torch.nn.functional.grouped_mm``); :meth:`padded_groups` lays the rows out as equal-sized
    groups for batched matmuls.
    """

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx
        values = idx.tolist()
        first = values[0] if values else 0
        self.start = first if values == list(range(first, first + len(values))) else None
        self.n_slots_used = len(set(values))
        self._sorted = all(a <= b for a, b in zip(values, values[1:]))  # host-side: no device sync
        self._groups: dict = {}

    def groups(self, tokens_per_row: int, n_slots: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``offs`` (n_slots,) int32 cumulative token counts per slot, and the token order that sorts
        tokens by slot (``None`` when they already are)."""
        key = (tokens_per_row, n_slots)
        hit = self._groups.get(key)
        if hit is None:
            slots = self.idx.repeat_interleave(tokens_per_row) if tokens_per_row > 1 else self.idx
            offs = torch.bincount(slots, minlength=n_slots).cumsum(0).to(torch.int32)
            order = None if self._sorted else torch.argsort(slots, stable=True)  # repeating rows keeps the order
            hit = self._groups[key] = (offs, order)
        return hit

    def padded_groups(self) -> tuple[torch.Tensor, Optional[int], int, torch.Tensor, torch.Tensor]:
        """The rows as G groups of m places, one group per slot in use: ``slots`` (G,) those slots in
        order, ``first`` when they are consecutive (``slots[0]``, else None), ``m`` the largest group,
        ``gather`` (G * m,) the row in each place (the row count, i.e. one past the last row, in places a
        smaller group leaves empty) and ``place`` (rows,) each row's place. Built on the host, once."""
        hit = self._groups.get("padded")
        if hit is None:
            values = self.idx.tolist()
            members: dict[int, list[int]] = {}
            for row, slot in enumerate(values):
                members.setdefault(slot, []).append(row)
            slots = sorted(members)
            m = max(len(rows) for rows in members.values())
            gather, place = [len(values)] * (len(slots) * m), [0] * len(values)
            for g, slot in enumerate(slots):
                for j, row in enumerate(members[slot]):
                    gather[g * m + j], place[row] = row, g * m + j
            first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
            device = self.idx.device
            hit = self._groups["padded"] = (torch.tensor(slots, device=device), first, m,
                                            torch.tensor(gather, device=device), torch.tensor(place, device=device))
        return hit


_MIXED: contextvars.ContextVar[Optional[MixedBatch]] = contextvars.ContextVar("peftkit_mixed_batch", default=None)

# How many mixed batches are open, in any thread. Layers read it before the ContextVar: with none
# open (the usual case) no ContextVar is read, which is cheaper on every layer's forward and lets
# torch.compile trace the layers (it cannot trace ``ContextVar.get``; it guards on this global).
# Read it as ``mixed.open_count`` (a module attribute: it changes).
open_count = 0
_OPEN_LOCK = threading.Lock()


def current_mixed_batch() -> Optional[MixedBatch]:
    """The batch being routed in this thread / task (set by :class:`mixed_batch`), or None."""
    return _MIXED.get() if open_count else None


class mixed_batch:
    """Context manager: route each row of the batches run inside it to its own adapter (``expand``,
    ``static``: see :class:`MixedBatch`; ``generate()`` sets ``expand``, the server ``static``)."""

    def __init__(self, names: Optional[Sequence[str]], expand: bool = False, static: bool = False):
        if names is not None and len(names) == 0:
            raise PeftkitError("adapter_names is empty; give one adapter name per row (\"__base__\" for none).")
        self.batch = MixedBatch(tuple(names), expand, static) if names is not None else None
        self._token = None

    def __enter__(self) -> Optional[MixedBatch]:
        global open_count
        self._token = _MIXED.set(self.batch)
        if self.batch is not None:
            with _OPEN_LOCK:
                open_count += 1
        return self.batch

    def __exit__(self, *exc: Any) -> None:
        global open_count
        _MIXED.reset(self._token)
        if self.batch is not None:
            with _OPEN_LOCK:
                open_count -= 1


def run_rows_by_slot(x: torch.Tensor, idx: torch.Tensor, module_for_slot: Any, args: tuple = (),
                     kwargs: Optional[dict] = None) -> torch.Tensor:
    """Each row ``i`` of ``x`` through ``module_for_slot(idx[i])``: arbitrary modules cannot be batched
    by weight gathering, so each distinct slot in the batch runs once on its rows."""
    out = None
    for slot in torch.unique(idx).tolist():
        rows = (idx == slot).nonzero().squeeze(1)
        part = module_for_slot(slot)(x.index_select(0, rows), *args, **(kwargs or {}))
        if out is None:
            out = part.new_zeros((x.shape[0],) + tuple(part.shape[1:]))
        out.index_copy_(0, rows, part)
    return out


def check_adapter_names(names: Sequence[str], known: Sequence[str]) -> None:
    """AdapterNameError listing the names (other than ``"__base__"``) that are not in ``known``."""
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise AdapterNameError(
            f"Unknown adapter name(s) {unknown}; loaded adapters: {list(known)} (use {BASE_ADAPTER!r} for the base model). "
            f"(Trying to infer with non-existing adapter(s): {', '.join(unknown)})"
        )


__all__ = ["BASE_ADAPTER", "MixedBatch", "RowPlan", "check_adapter_names", "current_mixed_batch", "mixed_batch",
           "run_rows_by_slot"]
