"""The running decode batch: its rows' key/value cache, left-padded, and the inputs of a prefill.

Every row of the batch is a sequence ``[kv prefix; virtual prompt; prompt; generated]`` whose entries
sit in one transformers ``DynamicCache`` whose layers are :class:`SlackLayer` buffers of shape (rows,
kv_heads, W, head_dim); ``mask`` (rows, W) marks the real entries (padding can sit anywhere: positions
are explicit). A row's next token gets the position ``length`` (its count of real entries), the position
it has when the row runs alone, so a row's outputs do not depend on the rows beside it.

A decode step writes its token into the next free column of every layer's buffer, in place, and
attention reads the whole buffer with the free columns masked out: no step copies the cache (a
``DynamicCache`` concatenates, i.e. copies every layer's cache, at every step; at 256 rows of about 110
entries that was half of the step). Rows join (:meth:`RunningBatch.add`: the shorter side left-padded,
then stacked) and leave (:meth:`RunningBatch.keep`) between steps, and the buffers are rebuilt then,
with :data:`ROOM` free columns, and when a step finds no free column; columns no row uses any more are
cut off the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from .host import PromptTokens

ROOM = 32  # free columns a rebuilt buffer gets: a copy of the cache every ROOM steps at most


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # configs transformers cannot read layer types from
        return DynamicCache()


class SlackLayer(DynamicLayer):
    """A decode-only cache layer: ``keys``/``values`` are (rows, heads, W, head_dim) buffers whose columns
    from ``used`` on are free. :meth:`update` writes a one-token step into column ``used`` in place and
    returns the whole buffers; the batch's mask hides the free columns. ``get_seq_length`` is ``W - 1``, so
    that transformers sizes the step's mask to the buffer's W columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int = ROOM) -> None:
        super().__init__()
        B, H, T, D = keys.shape
        self.keys = keys.new_zeros(B, H, T + room, D)
        self.values = values.new_zeros(B, values.shape[1], T + room, values.shape[-1])
        self.keys[:, :, :T] = keys
        self.values[:, :, :T] = values
        self.used = T
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1 or self.used >= self.keys.shape[-2]:
            raise RuntimeError("SlackLayer takes one-token steps into a free column (RunningBatch makes room).")
        self.keys[:, :, self.used] = key_states[:, :, 0]
        self.values[:, :, self.used] = value_states[:, :, 0]
        self.used += 1
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] - 1

    def live(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The written columns (views)."""
        return self.keys[:, :, :self.used], self.values[:, :, :self.used]


def _layers(cache: Any) -> list:
    return list(cache.layers)


class RunningBatch:
    """The rows being decoded (any objects, kept in cache order), their cache and attention mask."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # (rows, W) long: 1 on real entries
        self.used = 0  # columns written (the rest of W is free)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: Sequence[Any], cache: Any, mask: torch.Tensor) -> None:
        """Append ``rows`` whose cache and mask came from their prefill."""
        if not self.rows:
            self.rows = list(rows)
            self.cache = cache
            self._rebuild([(layer.keys, layer.values) for layer in _layers(cache)], mask)
            return
        T = max(self.used, mask.shape[1])
        parts = []
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            k, v = mine.live()
            parts.append((torch.cat([_left_pad(k, T), _left_pad(theirs.keys, T)]),
                          torch.cat([_left_pad(v, T), _left_pad(theirs.values, T)])))
        live = self.mask[:, :self.used]
        self._rebuild(parts, torch.cat([F.pad(live, (T - live.shape[1], 0)), F.pad(mask, (T - mask.shape[1], 0))]))
        self.rows.extend(rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at positions ``keep`` (in order); drop the columns no row uses."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            self.used = 0
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[:, :self.used].index_select(0, idx)
        start = int(mask.any(0).long().argmax())  # the first column a row still uses
        parts = []
        for layer in _layers(self.cache):
            k, v = layer.live()
            parts.append((k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]))
        self._rebuild(parts, mask[:, start:])

    def step_inputs(self, last: Sequence[int], lengths: Sequence[int]) -> dict[str, Any]:
        """The inputs of one decode step (each row's last token at its own position); its column in the mask."""
        if self.used >= self.mask.shape[1]:  # no free column: rebuild with room
            self._rebuild([layer.live() for layer in _layers(self.cache)], self.mask)
        device = self.mask.device
        self.mask[:, self.used] = 1
        self.used += 1
        return {"input_ids": torch.tensor(last, device=device).unsqueeze(1),
                "position_ids": torch.tensor(lengths, device=device).unsqueeze(1),
                "attention_mask": self.mask, "past_key_values": self.cache}

    def _rebuild(self, parts: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """The cache's layers become new buffers holding ``parts`` (per layer: keys, values of the written
        columns) with ROOM free columns; ``mask`` (rows, written columns) is padded likewise."""
        self.cache.layers[:] = [SlackLayer(k, v) for k, v in parts]
        self.used = mask.shape[1]
        self.mask = F.pad(mask, (0, ROOM))


def _left_pad(t: torch.Tensor, T: int) -> torch.Tensor:
    return t if t.shape[-2] == T else F.pad(t, (0, 0, T - t.shape[-2], 0))


@dataclass
class Prefill:
    """The inputs of a batched prefill and each row's real entry count afterwards."""

    inputs: dict[str, Any]
    lengths: list[int]


def build_prefill(model: nn.Module, prompts: Sequence[Sequence[int]], tokens: Sequence[Optional[PromptTokens]],
                  device: torch.device, dtype: torch.dtype) -> Prefill:
    """Inputs for the first forward of new rows: row ``i`` reads ``[P_i; E(prompt_i)]`` (``P_i`` its virtual
    prompt, if any) after its key/value prefix (if any), left-padded; positions count each row's real
    entries (prefix included), as when the row runs alone."""
    B = len(prompts)
    nk = [t.n if t is not None and t.kv is not None else 0 for t in tokens]
    ne = [t.n if t is not None and t.embeds is not None else 0 for t in tokens]
    lens = [e + len(p) for e, p in zip(ne, prompts)]
    Nk, Lx = max(nk), max(lens)
    embed = model.get_input_embeddings()
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    text = embed(flat).to(dtype).split([len(p) for p in prompts])
    x = torch.zeros(B, Lx, text[0].shape[-1], dtype=dtype, device=device)
    mask = torch.zeros(B, Nk + Lx, dtype=torch.long, device=device)
    pos = torch.zeros(B, Lx, dtype=torch.long, device=device)
    for i in range(B):
        parts = ([tokens[i].embeds] if ne[i] else []) + [text[i]]
        x[i, Lx - lens[i]:] = torch.cat(parts) if len(parts) > 1 else parts[0]
        mask[i, Nk - nk[i]:Nk] = 1
        mask[i, Nk + Lx - lens[i]:] = 1
        pos[i, Lx - lens[i]:] = torch.arange(nk[i], nk[i] + lens[i], device=device)
    cache = new_cache(model)
    if Nk:
        first = next(t for t in tokens if t is not None and t.kv is not None)
        for layer, (k0, v0) in enumerate(first.kv):
            K = k0.new_zeros(B, k0.shape[0], Nk, k0.shape[-1])
            V = v0.new_zeros(B, v0.shape[0], Nk, v0.shape[-1])
            for i, t in enumerate(tokens):
                if nk[i]:
                    K[i, :, Nk - nk[i]:] = t.kv[layer][0]
                    V[i, :, Nk - nk[i]:] = t.kv[layer][1]
            cache.update(K, V, layer)
    inputs = {"inputs_embeds": x, "attention_mask": mask, "position_ids": pos, "past_key_values": cache}
    return Prefill(inputs, [k + n for k, n in zip(nk, lens)])


__all__ = ["Prefill", "RunningBatch", "build_prefill", "new_cache"]
