"""The running decode batch: its rows' key/value cache, left-padded, and the inputs of a prefill.

Every row of the batch is a sequence ``[kv prefix; virtual prompt; prompt; generated]`` whose entries
are right-aligned in one transformers ``DynamicCache`` of shape (rows, kv_heads, T, head_dim) per layer;
``mask`` (rows, T) marks the real entries (padding can sit anywhere: positions are explicit). A row's
next token gets the position ``length`` (its count of real entries), the position it has when the row
runs alone, so a row's outputs do not depend on the rows beside it.

Rows join (:meth:`RunningBatch.add`: the shorter side is left-padded, then the caches are stacked) and
leave (:meth:`RunningBatch.keep`) between steps; columns that no row uses any more are cut off the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .host import PromptTokens


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except Exception:  # configs transformers cannot read layer types from
        return DynamicCache()


def _layers(cache: Any) -> list:
    return list(cache.layers)


class RunningBatch:
    """The rows being decoded (any objects, kept in cache order), their cache and attention mask."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None  # (rows, T) long

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: Sequence[Any], cache: Any, mask: torch.Tensor) -> None:
        """Append ``rows`` whose cache and mask came from their prefill."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        T = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            mine.keys = torch.cat([_left_pad(mine.keys, T), _left_pad(theirs.keys, T)])
            mine.values = torch.cat([_left_pad(mine.values, T), _left_pad(theirs.values, T)])
        self.mask = torch.cat([F.pad(self.mask, (T - self.mask.shape[1], 0)), F.pad(mask, (T - mask.shape[1], 0))])
        self.rows.extend(rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at positions ``keep`` (in order); drop the columns no row uses."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int(mask.any(0).long().argmax())  # the first column a row still uses
        self.mask = mask[:, start:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]

    def step_inputs(self, last: Sequence[int], lengths: Sequence[int]) -> dict[str, Any]:
        """The inputs of one decode step (each row's last token at its own position); grows the mask."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(last), 1)], dim=1)
        return {"input_ids": torch.tensor(last, device=device).unsqueeze(1),
                "position_ids": torch.tensor(lengths, device=device).unsqueeze(1),
                "attention_mask": self.mask, "past_key_values": self.cache}


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
