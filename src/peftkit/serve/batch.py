"""The running decode batch: its rows' key/value cache, left-padded, and the inputs of a prefill.

Every row of the batch is a sequence ``[kv prefix; virtual prompt; prompt; generated]`` whose entries
sit in one transformers ``DynamicCache`` whose layers are :class:`SlackLayer` buffers of shape
(capacity, kv_heads, W, head_dim), the batch's B rows first; ``mask`` (capacity, W) marks the real
entries (padding can sit anywhere: positions are explicit). A row's next token gets the position
``length`` (its count of real entries), the position it has when the row runs alone, so a row's outputs
do not depend on the rows beside it.

Nothing copies the whole cache in the common case:

* a decode step writes its token into the next free column of every layer's buffer, in place, and
  attention reads the B rows' whole buffer with the free columns masked out (a ``DynamicCache``
  concatenates, i.e. copies every layer's cache, at every step: at 256 rows of about 110 entries
  that was half of the step);
* rows that join (:meth:`RunningBatch.add`) are written into free rows of the buffers, their entries
  right-aligned with the written columns, when they fit (as many columns or fewer);
* rows that leave (:meth:`RunningBatch.keep`) make room for the last rows, which move into their
  places: a copy of the moved rows only.

A one-token step's attention over those buffers is two batched matrix products (:func:`decode_attention`,
registered with transformers' ``AttentionInterface`` as :data:`DECODE`; :func:`use_decode_attention` on
CPUs): SDPA's CPU kernel took 2.0 ms for 64 rows of 144 entries (8 heads of 32) where the products take
0.7, and 8.9 against 5.2 ms at 256 rows; anything else (a prefill, dropout, a window, soft-capping) goes to SDPA.

The buffers are rebuilt (the written part copied into new ones with :data:`ROOM` free columns, and
free rows for a quarter as many rows again, at least :data:`ROW_ROOM`) when joining rows do not fit,
when a step finds no free column, and when rows leaving free :data:`ROOM` or more columns on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..train.segments import register_attention
from .host import PromptTokens

DECODE = "peftkit_decode"  # the attention of one-token steps, registered by use_decode_attention
ROOM = 32  # free columns a rebuilt buffer gets: a copy of the cache every ROOM steps at most
ROW_ROOM = 16  # the least free rows a rebuilt buffer gets (else a quarter of its rows, up to max_rows in all)


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # configs transformers cannot read layer types from
        return DynamicCache()


class SlackLayer(DynamicLayer):
    """A decode-only cache layer: ``keys``/``values`` are (capacity, heads, W, head_dim) buffers whose
    columns from ``used`` on are free; a step of B rows uses the first B. :meth:`update` writes a
    one-token step into column ``used`` in place and returns the B rows' whole buffers (a view); the
    batch's mask hides the free columns. ``get_seq_length`` is ``W - 1``, so that transformers sizes
    the step's mask to the buffer's W columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int = ROOM, row_room: int = 0) -> None:
        super().__init__()
        B, H, T, D = keys.shape
        self.keys = keys.new_zeros(B + row_room, H, T + room, D)
        self.values = values.new_zeros(B + row_room, values.shape[1], T + room, values.shape[-1])
        self.keys[:B, :, :T] = keys
        self.values[:B, :, :T] = values
        self.used = T
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        B = key_states.shape[0]
        if key_states.shape[-2] != 1 or self.used >= self.keys.shape[-2] or B > self.keys.shape[0]:
            raise RuntimeError("SlackLayer takes one-token steps into a free column (RunningBatch makes room).")
        self.keys[:B, :, self.used] = key_states[:, :, 0]
        self.values[:B, :, self.used] = value_states[:, :, 0]
        self.used += 1
        return self.keys[:B], self.values[:B]

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] - 1

    def live(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The written columns of the first ``rows`` rows (views)."""
        return self.keys[:rows, :, :self.used], self.values[:rows, :, :self.used]


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of a one-token step (query (B, H, 1, D), keys/values (B, H_kv, W, D), a boolean or
    additive mask (B, 1, 1, W)), grouped-query heads without copying the keys::

        out[b, h] = softmax(scaling * q[b, h] K[b, h // G]^T + mask[b]) V[b, h // G],   G = H / H_kv

    returned as transformers' attention functions do, (B, 1, H, D). Other calls go to transformers' SDPA."""
    B, H, L, D = query.shape
    plain_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[2] == 1)
    if (L != 1 or dropout or not plain_mask or H % key.shape[1]
            or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "position_bias"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    Hkv = key.shape[1]
    scores = torch.matmul(query.reshape(B, Hkv, H // Hkv, D), key.transpose(-1, -2))  # (B, H_kv, G, W)
    scores.mul_(D ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(attention_mask.logical_not(), float("-inf"))
        else:
            scores.add_(attention_mask)
    out = torch.matmul(scores.softmax(-1), value)  # (B, H_kv, G, D)
    return out.reshape(B, 1, H, D), None


def use_decode_attention(model: nn.Module) -> bool:
    """Switch ``model`` (a transformers model) to :func:`decode_attention` where it pays: on a CPU, for a
    model that uses SDPA. True when switched."""
    if next(model.parameters()).device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register_attention(DECODE, decode_attention)
    model.set_attn_implementation(DECODE)
    return True


def _layers(cache: Any) -> list:
    return list(cache.layers)


class RunningBatch:
    """The rows being decoded (any objects, kept in cache order), their cache and attention mask;
    ``max_rows`` bounds the buffers' row capacity (the engine's largest batch)."""

    def __init__(self, max_rows: Optional[int] = None) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # (capacity, W) long: 1 on real entries
        self.used = 0  # columns written (the rest of W is free)
        self.max_rows = max_rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def capacity(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, rows: Sequence[Any], cache: Any, mask: torch.Tensor, more: int = 0) -> None:
        """Append ``rows`` whose cache and mask (rows, T) came from their prefill; ``more``: rows about to
        join after them (a rebuild leaves room for them)."""
        n, new, T = len(self.rows), len(rows), mask.shape[1]
        if not self.rows:
            self.rows = list(rows)
            self.cache = cache
            self._rebuild([(layer.keys, layer.values) for layer in _layers(cache)], mask, more)
            return
        if n + new <= self.capacity and T <= self.used:  # into free rows, right-aligned: no other row moves
            lo = self.used - T
            for mine, theirs in zip(_layers(self.cache), _layers(cache)):
                mine.keys[n:n + new, :, lo:self.used] = theirs.keys
                mine.values[n:n + new, :, lo:self.used] = theirs.values
            self.mask[n:n + new] = 0  # the rows' other columns hold stale (finite) entries: masked out
            self.mask[n:n + new, lo:self.used] = mask
            self.rows.extend(rows)
            return
        W = max(self.used, T)
        parts = []
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            k, v = mine.live(n)
            parts.append((torch.cat([_left_pad(k, W), _left_pad(theirs.keys, W)]),
                          torch.cat([_left_pad(v, W), _left_pad(theirs.values, W)])))
        live = self.mask[:n, :self.used]
        self._rebuild(parts, torch.cat([F.pad(live, (W - live.shape[1], 0)), F.pad(mask, (W - T, 0))]), more)
        self.rows.extend(rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at positions ``keep``. The kept rows beyond the new row count move into
        the places of the rows that leave (rows change places: read :attr:`rows` again); columns no row
        uses any more are cut off the left once they are :data:`ROOM` or more."""
        if len(keep) == len(self.rows):
            return
        n = len(keep)
        if not n:
            self.rows, self.cache, self.mask, self.used = [], None, None, 0
            return
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        rows = self.rows[:n]
        if holes:
            dst = torch.tensor(holes, device=self.mask.device)
            src = torch.tensor(movers, device=self.mask.device)
            for layer in _layers(self.cache):
                layer.keys[dst, :, :self.used] = layer.keys[src, :, :self.used]
                layer.values[dst, :, :self.used] = layer.values[src, :, :self.used]
            self.mask[dst] = self.mask[src]
            for h, m in zip(holes, movers):
                rows[h] = self.rows[m]
        self.rows = rows
        start = int(self.mask[:n, :self.used].any(0).long().argmax())  # the first column a row still uses
        if start >= ROOM:
            parts = [tuple(t[:, :, start:] for t in layer.live(n)) for layer in _layers(self.cache)]
            self._rebuild(parts, self.mask[:n, start:self.used])

    def step_inputs(self, last: Sequence[int], lengths: Sequence[int]) -> dict[str, Any]:
        """The inputs of one decode step (each row's last token at its own position); its column in the mask."""
        n = len(self.rows)
        if self.used >= self.mask.shape[1]:  # no free column: rebuild with room
            self._rebuild([layer.live(n) for layer in _layers(self.cache)], self.mask[:n])
        device = self.mask.device
        self.mask[:n, self.used] = 1
        self.used += 1
        return {"input_ids": torch.tensor(last, device=device).unsqueeze(1),
                "position_ids": torch.tensor(lengths, device=device).unsqueeze(1),
                "attention_mask": self.mask[:n], "past_key_values": self.cache}

    def _rebuild(self, parts: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, more: int = 0) -> None:
        """The cache's layers become new buffers holding ``parts`` (per layer: keys, values of the written
        columns of every row) with ROOM free columns and free rows (``more`` at least); ``mask`` (rows,
        written columns) is laid into a mask of the buffers' shape."""
        rows, used = mask.shape
        room = max(ROW_ROOM, rows // 4, more)
        if self.max_rows is not None:
            room = max(0, min(room, self.max_rows - rows))
        self.cache.layers[:] = [SlackLayer(k, v, ROOM, room) for k, v in parts]
        self.used = used
        self.mask = mask.new_zeros(rows + room, used + ROOM)
        self.mask[:rows, :used] = mask


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


__all__ = ["DECODE", "Prefill", "RunningBatch", "build_prefill", "decode_attention", "new_cache",
           "use_decode_attention"]
