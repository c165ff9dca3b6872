"""Attention over packed rows one example at a time: no (row x row) mask.

A packed row holds several examples whose ``position_ids`` restart at 0. transformers keeps them apart
with a block-diagonal causal mask over the whole row, so SDPA computes every (query, key) pair of the
row, ``L**2`` per row of length ``L``, and throws most of it away. For examples of lengths ``n_1 ..
n_k`` (their sum is ``L``) the attention that counts is::

    out[s_j : s_j + n_j] = softmax(Q_j K_j^T * scaling + causal) V_j      Q_j = Q[s_j : s_j + n_j], ...

which costs ``sum n_j**2 / 2``: at 8 examples of about 156 tokens in one 1,250-token row, about 16x
less than the masked row. :func:`segment_attention` computes exactly that with one causal SDPA per
example (the same kernel, so the same numbers up to float rounding), registered with transformers'
public ``AttentionInterface`` under :data:`SEGMENTS`. A sliding window shorter than an example gets
its window mask for that example; soft-capping, attention sinks and non-causal attention are refused.

The segments travel as the keyword argument ``peftkit_segments`` (a tuple per row of the example
lengths, from the host: no device sync) through the model's ``**kwargs`` to its attention modules.
A call without them (evaluation, generation) is transformers' own SDPA with its mask: the name is
registered with SDPA's mask function too. :func:`choose_segments` turns the path on per run where a
probe shows it equals the model's own attention, and :meth:`SegmentsPlan.active` switches the model
to it for a training step (forward and backward, so that recomputed checkpointed blocks use it too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, PeftkitError
from .collate import packed_matches_alone

SEGMENTS = "peftkit_segments"
SEGMENTS_MODES = ("auto", "segments", "mask")
# kwargs that change what attention computes; the segment path refuses them when set
UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, L, D), ``key``/``value`` (B, Hkv, L, D);
    returns (B, L, H, D). With ``kwargs["peftkit_segments"]`` (per row, example lengths summing to L)
    each example attends causally to itself only; without, transformers' SDPA attention."""
    segments = kwargs.get(SEGMENTS)
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    bad = [k for k in UNSUPPORTED if kwargs.get(k) is not None]
    if bad or not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise PeftkitError(f"{type(module).__name__}: segment attention is for plain causal attention "
                           f"(got {', '.join(bad) or 'non-causal attention'}).")
    length = query.shape[2]
    if len(segments) != query.shape[0] or any(sum(row) != length for row in segments):
        raise PeftkitError(f"peftkit_segments {segments} do not cover the {query.shape[0]} rows of {length} tokens.")
    gqa = query.shape[1] != key.shape[1]
    window = kwargs.get("sliding_window")
    rows = []
    # split (not slicing): the backward of a split is one concatenation, not a zero-filled tensor per piece
    for lengths, q, k, v in zip(segments, query.split(1), key.split(1), value.split(1)):
        parts = [F.scaled_dot_product_attention(qi, ki, vi, attn_mask=_window_mask(qi.shape[2], window, qi.device),
                                                dropout_p=dropout, is_causal=window is None or qi.shape[2] <= window,
                                                scale=scaling, enable_gqa=gqa)
                 for qi, ki, vi in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _window_mask(n: int, window: Optional[int], device: torch.device) -> Optional[torch.Tensor]:
    """None (plain causal) unless an example of ``n`` tokens is longer than the sliding ``window``: then
    query i sees keys j with ``i - window < j <= i`` (transformers' sliding-window mask)."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def register_attention(name: str, function: Any) -> None:
    """Register ``function`` under ``name`` with transformers' public ``AttentionInterface``, with SDPA's
    mask function, so that a model switched to ``name`` builds the masks it builds for SDPA (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def register() -> None:
    """Register :data:`SEGMENTS` with transformers' attention and mask interfaces (idempotent)."""
    register_attention(SEGMENTS, segment_attention)


def segment_lengths(position_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Per row, the lengths of the runs that start where ``position_ids`` is 0 (a packed row's examples;
    a padding tail, whose positions restart at 0 too, is a run of its own). ``position_ids``: (B, L) on
    the host."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            starts = [0] + starts
        out.append(tuple(b - a for a, b in zip(starts, starts[1:] + [len(row)])))
    return tuple(out)


@dataclass
class SegmentsPlan:
    """Whether a run's packed rows take :func:`segment_attention` (``enabled``), and why."""

    enabled: bool
    reason: str
    model: Optional[nn.Module] = field(default=None, repr=False)  # the transformers model switched per step

    def describe(self) -> str:
        return f"{'per example' if self.enabled else 'masked rows'}: {self.reason}"

    def active(self) -> contextlib.AbstractContextManager:
        """The model's attention is :data:`SEGMENTS` inside (when enabled), its own again after."""
        return use_attention(self.model, SEGMENTS) if self.enabled else contextlib.nullcontext()


@contextlib.contextmanager
def use_attention(model: nn.Module, name: str) -> Iterator[None]:
    """``model`` (a transformers model) runs the registered attention ``name`` inside, its own after."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def choose_segments(model: nn.Module, mode: str, packed: bool, compiled: bool,
                    device: Optional[torch.device] = None) -> SegmentsPlan:
    """The segment path for ``model`` (the transformers model under any PeftModel): ``mode`` auto takes it
    for packed rows on the CPU where the model uses SDPA and :func:`probe` passes; segments asks for it
    (a ConfigError where it does not apply); mask keeps transformers' masked rows."""
    if mode not in SEGMENTS_MODES:
        raise ConfigError(f"packed_attention must be one of {SEGMENTS_MODES}, got {mode!r}.")
    device = device or next(model.parameters()).device
    if mode == "mask":
        return SegmentsPlan(False, "packed_attention mask")
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not packed:
        why_not = "the rows are not packed"
    elif compiled:
        why_not = "compiled blocks would recompile for every set of example lengths"
    elif attention != "sdpa":
        why_not = f"the model's attention is {attention!r}, not sdpa"
    elif mode == "auto" and device.type != "cpu":
        why_not = f"auto takes it on the CPU only (not measured on {device.type}); --packed-attention segments asks"
    else:
        why_not = probe(model, device)
    if why_not is None:
        return SegmentsPlan(True, "one causal SDPA per packed example, no row mask", model)
    if mode == "segments":
        raise ConfigError(f"--packed-attention segments does not apply: {why_not}. Use auto or mask.")
    return SegmentsPlan(False, why_not)


def probe(model: nn.Module, device: torch.device) -> Optional[str]:
    """None when two short random sequences packed in one row (plus a padding tail) give under
    :func:`segment_attention` the logits they give alone under the model's own attention, else why not."""
    register()
    lengths = (5, 7, 3)
    seen: list[int] = []
    plan = SegmentsPlan(True, "probe", model)
    try:
        same = packed_matches_alone(model, getattr(model.config, "vocab_size", 100), lengths, device,
                                    _probing(plan, seen), **{SEGMENTS: (lengths,)})
    except Exception as exc:  # the model refuses the keyword, or its attention has more than a causal mask
        return f"the model does not run segment attention ({type(exc).__name__}: {exc})"
    if not seen:
        return "the model does not pass keyword arguments down to its attention"
    if not same:
        return "segment attention does not reproduce the model's own attention"
    return None


@contextlib.contextmanager
def _probing(plan: SegmentsPlan, seen: list[int]) -> Iterator[None]:
    """``plan`` active, and each call of the attention function that carried segments recorded in ``seen``."""
    from transformers import AttentionInterface

    def counting(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if kwargs.get(SEGMENTS) is not None:
            seen.append(1)
        return segment_attention(module, *args, **kwargs)

    AttentionInterface.register(SEGMENTS, counting)
    try:
        with plan.active():
            yield
    finally:
        AttentionInterface.register(SEGMENTS, segment_attention)


__all__ = ["SEGMENTS", "SEGMENTS_MODES", "SegmentsPlan", "choose_segments", "probe", "register", "segment_attention",
           "register_attention", "segment_lengths", "use_attention"]
