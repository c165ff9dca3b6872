"""The last decoder block's per-position work only at the loss positions (causal LMs, chunked head).

The chunked loss head (:mod:`.loss_head`) reads the body's last hidden states only at the N target
positions of a batch. In the last decoder block every position still needs its key and value (the
targets attend to them), but the rest is per position: the query projection, and after attention the
output projection, the residual, the second norm and the MLP. So in that block, with x the block's
normed input, a the attention output and u the normed residual::

    q_t = q_proj(x_t),   o_t = o_proj(a_t),   m_t = mlp(u_t)     for t in targets only (0 elsewhere)

The block's outputs at the other positions are then wrong, and nothing reads them; at the targets they
are the full block's, so the loss and every gradient are the plain path's to float rounding
(tests/test_last_block.py). It saves (T - N) / T of those three products' forward and backward work in
one block: on the 100M benchmark row (12 blocks, 45% of the tokens targets) about 3% of a step's FLOPs.

How: forward pre-hooks on the three modules take the target rows, (B, T, d) -> (1, N, d), and forward
hooks put each result back into a zero (B, T, d') tensor; they are registered around the body's call
(:func:`at_targets`) and removed after it. Where: the last of the model's repeated blocks has ``mlp``
and ``self_attn.o_proj`` (transformers' Llama-style decoders: Llama, Mistral, Qwen2/3, Gemma, ...;
``q_proj`` when it has one), the MLP is not a mixture of experts (routing, capacity and the auxiliary
loss see every token), and a probe agrees: the body's last hidden states at some positions equal with
and without the cut. A module holding a dropout (LoRA dropout, say) is left whole: over N rows it would
draw other masks than the plain path over B * T, and runs are to take the same draws whatever the speed
options. Not with activation checkpointing or compiled blocks (their recomputation and graphs would run
the block without the hooks): the trainer then keeps the whole block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .speed import decoder_blocks
from .trainable import in_mode


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class LastBlock:
    """The cut of one run: the modules computed at target positions only, or why there is none."""

    modules: list[nn.Module] = field(default_factory=list, repr=False)
    reason: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.modules)

    @classmethod
    def whole(cls, why: str) -> "LastBlock":
        """No cut, because ``why`` (e.g. "activation checkpointing recomputes") the block without the hooks."""
        return cls(reason=f"{why} the block without the cut")

    def drop(self, why: str) -> None:
        """Keep the whole block from now on (``why``: as in :meth:`whole`)."""
        self.modules, self.reason = [], LastBlock.whole(why).reason

    def describe(self) -> str:
        if self.enabled:
            return "last block's q/o projections and MLP at target positions only"
        return f"last block whole ({self.reason})"


class _Rows:
    """The hooks of one call: ``pick`` takes rows ``index`` of a (B, T, d) input, ``put`` scatters an
    (1, N, d') output back into zeros of (B, T, d')."""

    def __init__(self, index: torch.Tensor, batch: int, length: int) -> None:
        self.index, self.batch, self.length = index, batch, length

    def pick(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.index).unsqueeze(0), *args[1:])

    def put(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        rows = out.reshape(-1, out.shape[-1])
        full = rows.new_zeros(self.batch * self.length, rows.shape[-1]).index_copy(0, self.index, rows)
        return full.view(self.batch, self.length, -1)


@contextlib.contextmanager
def at_targets(cut: Optional[LastBlock], index: torch.Tensor, batch: int, length: int) -> Iterator[None]:
    """Within the block, ``cut``'s modules compute only rows ``index`` (flat positions into B * T)."""
    if cut is None or not cut.enabled:
        yield
        return
    rows = _Rows(index, batch, length)
    handles = []
    try:
        for module in cut.modules:
            handles.append(module.register_forward_pre_hook(rows.pick))
            handles.append(module.register_forward_hook(rows.put))
        yield
    finally:
        for handle in handles:
            handle.remove()


def choose_last_block(body: nn.Module, device: Optional[torch.device] = None) -> LastBlock:
    """The cut for ``body`` (the decoder the chunked head runs), or a LastBlock saying why there is none."""
    blocks = decoder_blocks(body)
    if not blocks:
        return LastBlock(reason="no repeated decoder blocks")
    last = blocks[-1]
    attention, mlp = getattr(last, "self_attn", None), getattr(last, "mlp", None)
    o_proj = getattr(attention, "o_proj", None)
    if not isinstance(mlp, nn.Module) or not isinstance(o_proj, nn.Module):
        return LastBlock(reason=f"{type(last).__name__} has no mlp and self_attn.o_proj")
    if any(hasattr(m, "experts") or "moe" in type(m).__name__.lower() for m in mlp.modules()):
        return LastBlock(reason="the MLP is a mixture of experts (routing sees every token)")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in body.modules()):  # transformers' switch
        return LastBlock.whole("activation checkpointing recomputes")
    candidates = [m for m in (getattr(attention, "q_proj", None), o_proj, mlp) if isinstance(m, nn.Module)]
    cut = LastBlock([m for m in candidates if not _drops(m)])
    if not cut.enabled:
        return LastBlock(reason="dropout in the block's projections and MLP (the cut would draw other masks)")
    problem = _probe(body, cut, device)
    return cut if problem is None else LastBlock(reason=problem)


def _drops(module: nn.Module) -> bool:
    """Whether ``module`` holds a dropout: its mask over N rows would be other draws than over B * T."""
    return any(isinstance(m, DROPOUTS) and m.p > 0 for m in module.modules())


def _probe(body: nn.Module, cut: LastBlock, device: Optional[torch.device]) -> Optional[str]:
    """None when ``body``'s last hidden states at some positions of a short random row equal the cut's."""
    ids = probe_ids(body, 9, device)
    index = torch.tensor([2, 3, 6, 7], device=ids.device)
    try:
        with in_mode(body, False), torch.no_grad():
            full = last_hidden(body(input_ids=ids, use_cache=False)).reshape(9, -1)[index]
            with at_targets(cut, index, 1, 9):
                split = last_hidden(body(input_ids=ids, use_cache=False)).reshape(9, -1)[index]
    except Exception as exc:  # noqa: BLE001 - any failure means: this block does not take the cut
        return f"the block does not run on target rows ({type(exc).__name__}: {exc})"
    if not torch.allclose(full.float(), split.float(), rtol=1e-4, atol=1e-5):
        return "the block's outputs at the targets change when other positions are left out"
    return None


def probe_ids(model: nn.Module, length: int, device: Optional[torch.device]) -> torch.Tensor:
    """A seeded random row (1, length) of token ids of ``model``'s vocabulary, on ``device``."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 16)
    ids = torch.randint(3, max(4, vocab), (1, length), generator=torch.Generator().manual_seed(0))
    return ids.to(device or next(model.parameters()).device)


def last_hidden(out: Any) -> torch.Tensor:
    """The last hidden states (B, T, H) of a transformers body's output (a ModelOutput or a tuple)."""
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


__all__ = ["LastBlock", "at_targets", "choose_last_block", "last_hidden", "probe_ids"]
