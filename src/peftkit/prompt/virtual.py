"""The virtual tokens of a batch: each row's soft prompt or key/value prefix, padded and masked.

How virtual tokens reach the model (the batch has ``B`` rows of ``L`` tokens):

* **input prompts** (prompt tuning, P-tuning): the model reads ``[P; E(x)]`` (``E`` its input
  embeddings) with the attention mask ``[1ⁿ; m]``.
* **key/value prefixes** (prefix tuning, P-tuning v2): the prompt matrix is viewed as
  ``(2·layers, kv_heads, n, head_dim)`` and written into a transformers ``DynamicCache`` (an
  ``EncoderDecoderCache`` self-attention cache for encoder-decoder decoders), passed as
  ``past_key_values``; the attention mask gets ``1ⁿ`` in front. For encoder-decoder models decoder
  layer ``i`` uses stored layer ``2·i mod layers``, what Hugging Face PEFT computes from the same
  tensor, so that a folder gives the same outputs in both libraries.

**Mixed batches** may combine adapters of different lengths and methods. Each row's prompt is
left-padded to the longest prompt of its kind and the padding is masked out, so row ``i`` reads
``[pad; P_i; x_i]``. Position ids give a row's tokens the positions they get when the row runs with
its adapter alone (:func:`positions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.mixed import BASE_ADAPTER
from ..errors import PeftkitError
from .encoder_prefix import encoder_attentions
from .introspect import accepts, is_relative, text_config


@dataclass
class Virtual:
    """What the adapters of a batch add. ``n_input``/``n_prefix``: real virtual tokens per row (on
    the batch's device, for index arithmetic); ``input_counts``/``prefix_counts``: the same on the
    host, for decisions that must not wait for the device."""

    embeds: Optional[torch.Tensor]  # (B, Np, d)
    embeds_mask: Optional[torch.Tensor]  # (B, Np)
    kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]]  # per decoder layer: (B, H, Nk, hd) each
    kv_mask: Optional[torch.Tensor]  # (B, Nk)
    n_input: torch.Tensor  # (B,)
    n_prefix: torch.Tensor  # (B,)
    input_counts: tuple[int, ...]
    prefix_counts: tuple[int, ...]
    enc_kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # per encoder layer (encoder_prefix)
    enc_kv_mask: Optional[torch.Tensor] = None  # (B, Nk): kv_mask, zero for rows without encoder prefixes
    enc_full: bool = False  # every row reads all Nk encoder-prefix columns (no mask needed)

    @property
    def uniform(self) -> bool:
        """Every row has the same virtual-token count of each kind (no padding added), also when
        the rows' adapters differ."""
        return self.uniform_input and self.uniform_prefix

    @property
    def uniform_input(self) -> bool:
        return len(set(self.input_counts)) <= 1

    @property
    def uniform_prefix(self) -> bool:
        return len(set(self.prefix_counts)) <= 1

    @property
    def n_embeds(self) -> int:
        return 0 if self.embeds is None else self.embeds.shape[1]

    @property
    def n_kv(self) -> int:
        return 0 if self.kv_mask is None else self.kv_mask.shape[1]


def encoded_output(encoder: nn.Module) -> torch.Tensor:
    """The encoder's output for all its virtual tokens, ``(tokens, width)``: what the model uses and
    what Hugging Face PEFT saves as ``prompt_embeddings``."""
    n = encoder.embedding.num_embeddings
    idx = torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0)
    return encoder(idx)[0]


def adapter_tokens(peft: nn.Module, name: str) -> torch.Tensor:
    """Adapter ``name``'s virtual tokens as used: (n, token_dim) or (n, 2·layers·token_dim)."""
    config = peft.peft_config[name]
    out = encoded_output(peft.prompt_encoder[name])
    return out[: config.num_virtual_tokens]


def build_virtual(peft: nn.Module, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> Virtual:
    """The virtual tokens of a batch of the prompt model ``peft`` whose row ``i`` uses adapter ``names[i]``."""
    slots = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    B = len(names)
    encoded = {n: adapter_tokens(peft, n) for n in slots}
    is_kv = {n: peft.peft_config[n].uses_kv_prefix for n in slots}
    lengths = {n: encoded[n].shape[0] for n in slots}
    input_counts = tuple(0 if n == BASE_ADAPTER or is_kv[n] else lengths[n] for n in names)
    prefix_counts = tuple(lengths[n] if n != BASE_ADAPTER and is_kv[n] else 0 for n in names)
    n_input = torch.tensor(input_counts, device=device)
    n_prefix = torch.tensor(prefix_counts, device=device)
    single = len(set(names)) == 1 and slots

    def block(kind_is_kv: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        members = [n for n in slots if is_kv[n] == kind_is_kv]
        if not members:
            return None, None
        width = max(lengths[n] for n in members)
        if single:
            t = encoded[members[0]].unsqueeze(0).expand(B, -1, -1)
            return t, torch.ones(B, width, dtype=torch.long, device=device)
        dim = encoded[members[0]].shape[-1]
        table = [encoded[members[0]].new_zeros(width, dim)]
        masks = [torch.zeros(width, dtype=torch.long, device=device)]
        index = {}
        for n in members:
            pad = width - lengths[n]
            index[n] = len(table)
            table.append(F.pad(encoded[n], (0, 0, pad, 0)))
            m = torch.zeros(width, dtype=torch.long, device=device)
            m[pad:] = 1
            masks.append(m)
        rows = torch.tensor([index.get(n, 0) for n in names], device=device)
        return torch.stack(table)[rows], torch.stack(masks)[rows]

    embeds, embeds_mask = block(False)
    if embeds is not None:
        embeds = embeds.to(device=device, dtype=dtype)
    z, kv_mask = block(True)
    out = Virtual(embeds, embeds_mask, None, kv_mask, n_input, n_prefix, input_counts, prefix_counts)
    if z is not None:
        z = z.to(device=device, dtype=dtype)
        first = next(n for n in slots if is_kv[n])
        out.kv = split_prefix(peft, z, first)
        on_encoder = {n for n in slots if is_kv[n] and getattr(peft.peft_config[n], "encoder_prefix", False)}
        if on_encoder:
            out.enc_kv = split_prefix(peft, z, first, encoder=True)
            rows = torch.tensor([n in on_encoder for n in names], device=device)
            out.enc_kv_mask = kv_mask * rows.unsqueeze(1).to(kv_mask.dtype)
            out.enc_full = out.uniform and all(n in on_encoder for n in names)
    return out


def split_prefix(peft: nn.Module, z: torch.Tensor, name: str, encoder: bool = False
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``z`` (B, n, 2·layers·token_dim) -> per-layer (key, value), each (B, heads, n, head_dim).

    Encoder-decoder models: Hugging Face PEFT's duplicate-and-split gives decoder layer ``i``
    stored pair ``2i mod L`` for its self-attention (and ``2i+1 mod L`` for a cross-attention
    cache it then drops); ``encoder=True`` returns those odd pairs, one per encoder layer."""
    config = peft.peft_config[name]
    B, n, _ = z.shape
    L, H = config.num_layers, config.num_attention_heads
    pkv = z.view(B, n, 2 * L, H, config.token_dim // H).permute(2, 0, 3, 1, 4)
    if encoder:
        sources = [(2 * j + 1) % L for j in range(len(encoder_attentions(peft.base_model)))]
    elif peft.task == "SEQ_2_SEQ_LM":
        sources = [(2 * i) % L for i in range(L)]
    else:
        sources = list(range(L))
    return [(pkv[2 * src].contiguous(), pkv[2 * src + 1].contiguous()) for src in sources]


def make_cache(base: nn.Module, task: str, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A transformers cache holding the per-layer prefixes ``kv`` (an ``EncoderDecoderCache`` whose
    self-attention part holds them, for encoder-decoder models)."""
    from transformers import DynamicCache, EncoderDecoderCache

    if task == "SEQ_2_SEQ_LM":
        self_attn = DynamicCache()
        for i, (k, v) in enumerate(kv):
            self_attn.update(k, v, i)
        return EncoderDecoderCache(self_attn, DynamicCache())
    cfg = getattr(base, "config", None)
    try:
        cache = DynamicCache(config=cfg)
    except Exception:  # configs transformers cannot read layer types from
        cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def positions(base: nn.Module, v: Virtual, L: int, user: Optional[torch.Tensor], device: torch.device
              ) -> Optional[torch.Tensor]:
    """Position ids of ``[prompt block; text]`` that give each row the positions it has alone."""
    if v.uniform and user is None:
        return None  # the model's default positions are already the single-adapter ones
    if not accepts(base.forward, "position_ids"):
        if is_relative(text_config(base)):
            return None  # relative positions: left padding shifts nothing that matters
        raise PeftkitError(
            f"Rows with virtual tokens of different lengths need per-row position ids, which "
            f"{type(base).__name__} does not take; run rows with equally long prompts together."
        )
    B = v.n_input.shape[0]
    text = user.to(device) if user is not None else torch.arange(L, device=device).expand(B, L)
    text = text + (v.n_input + v.n_prefix).unsqueeze(1)
    if not v.n_embeds:
        return text
    Np = v.n_embeds
    prompt = (torch.arange(Np, device=device).unsqueeze(0) - (Np - v.n_input).unsqueeze(1)).clamp(min=0)
    return torch.cat([prompt, text], dim=1)


def roll(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``t`` (B, T, ...) left by ``shift[b]`` positions along dim 1."""
    T = t.shape[1]
    idx = (torch.arange(T, device=t.device).unsqueeze(0) + shift.to(t.device).unsqueeze(1)) % T
    idx = idx.view(idx.shape + (1,) * (t.dim() - 2)).expand(t.shape)
    return t.gather(1, idx)


__all__ = ["Virtual", "build_virtual", "adapter_tokens", "encoded_output", "make_cache", "positions", "roll", "split_prefix"]
