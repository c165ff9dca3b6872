"""The LM head and the loss only where the loss is taken, in chunks (causal LMs).

The plain path runs the whole model and takes the cross-entropy of its logits: a ``(tokens x vocab)``
float tensor over every position, prompt and padding included, and its gradient of the same size.
For a causal LM whose logits are ``lm_head(h)`` of the body's last hidden states ``h`` (B, T, H),
the loss of a batch only needs the rows ``h[b, t]`` whose next label ``labels[b, t + 1]`` is not
-100. :func:`chunked_loss_sum` runs the body, gathers those N rows (N, H), and applies the head and
the cross-entropy to them ``chunk_rows`` rows at a time::

    loss = sum over chunks c of  sum_i  logsumexp(z_ci) - z_ci[y_ci],   z_c = head(h_c).float()  (n_c, V)

The gradient is computed chunk by chunk in the forward pass (as Liger's fused linear cross-entropy
does): for each chunk the logits' gradient ``softmax(z_c) - onehot(y_c)`` is written directly (one
pass over the logits, in place: no log-softmax, no zero-filled tensor), and ``dloss/dh_c`` and ``dloss/dθ`` for
the head's trainable parameters θ (a LoRA or ``modules_to_save`` copy on ``lm_head``, tied embeddings)
are taken from it with ``torch.autograd.grad`` while the chunk's logits exist, then freed; the
backward pass only scales the stored gradients by
the incoming scalar. So at most one chunk of logits (and its gradient) exists at a time, and the
head's matmul runs once per chunk instead of being recomputed. The result equals the plain path to
float rounding (the sums run in another order).

:func:`choose_loss_head` decides per model, and says why: models whose logits are not plain
``lm_head(h)`` (soft-capping, logit scaling, no separable body and head, prompt-learning methods that
prepend virtual tokens) take the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .data import IGNORE_INDEX
from .last_block import LastBlock, at_targets, choose_last_block, last_hidden, probe_ids
from .step import loss_sum
from .trainable import in_mode, is_peft_model, is_prompt_learning, unwrap

LOSS_HEAD_MODES = ("auto", "chunked", "full")

# config attributes that make the logits something else than lm_head(h) when set
NOT_PLAIN_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_logits_scaling")

# logits per chunk: 2**24 float32 values (64 MiB) and as much for their gradient
CHUNK_ELEMENTS = 2 ** 24
MIN_CHUNK_ROWS = 256
MAX_CHUNK_ROWS = 8192


@dataclass
class LossHead:
    """Which loss path a run takes: ``"chunked"`` (``body`` then ``head`` on the loss positions,
    ``chunk_rows`` at a time) or ``"full"`` (the model's logits everywhere), and why."""

    path: str
    reason: str
    body: Optional[nn.Module] = field(default=None, repr=False)
    head: Optional[nn.Module] = field(default=None, repr=False)
    chunk_rows: int = 0
    last_block: Optional[LastBlock] = field(default=None, repr=False)

    def describe(self) -> str:
        """One line for the run's report."""
        if self.path == "chunked":
            cut = f"; {self.last_block.describe()}" if self.last_block is not None else ""
            return f"chunked: LM head + cross-entropy on target positions only, {self.chunk_rows} rows a chunk{cut}"
        return f"full logits: {self.reason}"


def chunk_rows_for(vocab_size: int) -> int:
    """Rows of a chunk: ``CHUNK_ELEMENTS / vocab`` clamped to [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]."""
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab_size, 1)))


def choose_loss_head(model: nn.Module, task_type: str, mode: str = "auto",
                     device: Optional[torch.device] = None, last_block: bool = True) -> LossHead:
    """The loss path of ``model`` for ``mode`` (auto: chunked where exact, else full); chunked, with the
    last block at target positions only where ``last_block`` and :func:`~.last_block.choose_last_block` allow.

    ``mode="chunked"`` on a model where it is not exact raises ConfigError with the reason.
    """
    if mode not in LOSS_HEAD_MODES:
        raise ConfigError(f"loss_head must be one of {', '.join(LOSS_HEAD_MODES)}, got {mode!r}.")
    if mode == "full":
        return LossHead("full", "asked for (loss_head full)")
    reason, body, head = _split_model(model, task_type, device)
    if reason is not None:
        if mode == "chunked":
            raise ConfigError(f"--loss-head chunked does not apply: {reason}. Use --loss-head auto or full.")
        return LossHead("full", reason)
    vocab = int(head.weight.shape[0]) if isinstance(getattr(head, "weight", None), torch.Tensor) else 0
    vocab = vocab or int(getattr(getattr(unwrap(model), "config", None), "vocab_size", 0) or 0)
    return LossHead("chunked", "the logits are lm_head(last hidden state)", body, head, chunk_rows_for(vocab),
                    choose_last_block(body, device) if last_block else LastBlock(reason="last_block_at_targets off"))


def _split_model(model: nn.Module, task_type: str,
                 device: Optional[torch.device]) -> tuple[Optional[str], Optional[nn.Module], Optional[nn.Module]]:
    """(None, body, head) when ``model``'s logits are ``head(body(...).last_hidden_state)``, else (why not, ...)."""
    if task_type != "CAUSAL_LM":
        return f"the task is {task_type}, not CAUSAL_LM", None, None
    if is_prompt_learning(model):
        return "prompt-learning methods prepend virtual tokens to every row", None, None
    outer = unwrap(model)
    lm = outer.get_base_model() if is_peft_model(outer) else outer
    config = getattr(lm, "config", None)
    for name in NOT_PLAIN_CONFIG:
        value = getattr(config, name, None)
        if value is not None and value is not False:
            return f"the model's config sets {name} = {value} (the logits are not lm_head(hidden))", None, None
    get_head, get_body = getattr(lm, "get_output_embeddings", None), getattr(lm, "get_decoder", None)
    if not callable(get_head) or not callable(get_body):
        return f"{type(lm).__name__} has no get_output_embeddings() / get_decoder()", None, None
    try:
        head, body = get_head(), get_body()
    except (AttributeError, NotImplementedError, ValueError) as exc:
        return f"{type(lm).__name__} has no separable body and head ({exc})", None, None
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is lm:
        return f"{type(lm).__name__} has no separable body and LM head", None, None
    problem = _probe(outer, body, head, device)
    return problem, body, head


def _probe(model: nn.Module, body: nn.Module, head: nn.Module, device: Optional[torch.device]) -> Optional[str]:
    """None when ``model``'s logits equal ``head(body(ids).last_hidden_state)`` on a short random sequence."""
    ids = probe_ids(model, 6, device)
    try:
        with in_mode(model, False), torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            split = head(last_hidden(body(input_ids=ids, use_cache=False))).float()
    except Exception as exc:  # noqa: BLE001 - any failure means: not separable this way
        return f"the body and head do not run apart ({type(exc).__name__}: {exc})"
    if full.shape != split.shape or not torch.allclose(full, split, rtol=1e-4, atol=1e-5):
        return "the model's logits are not lm_head(last hidden state)"
    return None


class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``head(hidden)`` against ``labels``, chunk by chunk, gradients taken in
    the forward pass (see the module docstring). Inputs: hidden (N, H), labels (N,), the head, the
    chunk size, then the head's trainable parameters (so that autograd routes their gradients)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_rows: int,
                *params: torch.Tensor) -> torch.Tensor:
        want_h = bool(ctx.needs_input_grad[0])
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_p = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, max(hidden.shape[0], 1), chunk_rows):
            h = hidden[start:start + chunk_rows].detach().requires_grad_(want_h)
            y = labels[start:start + chunk_rows].unsqueeze(1)
            with torch.enable_grad():
                logits = head(h).float()
            inputs = ([h] if want_h else []) + list(params)
            if not (inputs and logits.requires_grad):
                with torch.no_grad():
                    total += (torch.logsumexp(logits, dim=-1, keepdim=True) - logits.gather(1, y)).sum()
            else:
                grad_z = _loss_and_softmax_(logits.detach(), y, total)
                grad_z.scatter_add_(1, y, grad_z.new_full(y.shape, -1.0))
                grads = torch.autograd.grad(logits, inputs, grad_z, allow_unused=True)
                if want_h:
                    grad_h[start:start + chunk_rows] = grads[0]
                    grads = grads[1:]
                for acc, g in zip(grad_p, grads):
                    if g is not None:
                        acc += g
                del grad_z
            del logits
        ctx.save_for_backward(*([grad_h] if want_h else []), *grad_p)
        ctx.want_h = want_h
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.want_h else None
        return (grad_h, None, None, None, *[g * grad_out for g in saved])


@torch.no_grad()
def _loss_and_softmax_(z: torch.Tensor, y: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Add ``sum_i lse(z_i) - z_i[y_i]`` to ``total`` and turn the logits ``z`` (n, V) into ``softmax(z)`` in
    place: ``m = max_j z_ij``, ``p = exp(z - m)``, ``lse = m + log sum_j p_ij``, ``softmax = p / sum_j p_ij``.
    No (n, V) tensor is allocated (each one is fresh pages from the OS: a chunk of logits is tens of MB).
    The head's backward must not need its output (a linear head's does not; autograd raises if it did)."""
    picked = z.gather(1, y)
    m = z.amax(dim=1, keepdim=True)
    p = z.sub_(m).exp_()
    sums = p.sum(dim=1, keepdim=True)
    total += (m + sums.log() - picked).sum()
    return p.div_(sums)


def head_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_rows: int) -> torch.Tensor:
    """``sum CE(head(hidden).float(), labels)`` over rows (N, H) / (N,), one chunk of logits at a time."""
    if not torch.is_grad_enabled():
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = head(hidden[start:start + chunk_rows]).float()
            total += F.cross_entropy(logits, labels[start:start + chunk_rows], reduction="sum")
        return total
    params = [p for p in head.parameters() if p.requires_grad]
    return _HeadLoss.apply(hidden, labels, head, chunk_rows, *params)


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """The loss positions of ``labels`` (B, T) as flat indices (N,) into its B * T positions: position
    ``b * T + t`` when ``labels[b, t + 1] != -100`` (its hidden state predicts that label, the flat
    position after it).

    Computed where ``labels`` lives: the trainer computes it on the host before the batch goes to the
    device, so that selecting the rows does not wait on the device (boolean indexing there would)."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep.reshape(-1).nonzero().squeeze(1)


def chunked_loss_sum(plan: LossHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed causal-LM loss of ``batch`` through ``plan``'s body and head, on target positions only.

    Position t of row b is kept when ``labels[b, t + 1] != -100``; its hidden state (H,) predicts that label.
    ``batch["target_index"]``, when given, holds those positions (:func:`target_index`), else they are found here.
    """
    labels = batch["labels"]
    index = batch.get("target_index")
    if index is None:
        index = target_index(labels)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "target_index")}
    with at_targets(plan.last_block, index, *labels.shape):
        hidden = last_hidden(plan.body(**inputs, use_cache=False))  # (B, T, H)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
    targets = labels.reshape(-1).index_select(0, index + 1)  # (N,): the next position's label
    return head_loss_sum(rows, targets, plan.head, plan.chunk_rows)


class LossForward(nn.Module):
    """The training forward: ``forward(batch)`` is the batch's summed loss through ``plan``'s path.

    It holds the model under training as a submodule, so DDP can wrap it (the forward must go
    through DDP for gradients to be synchronised, and the chunked path calls the body directly).
    """

    def __init__(self, model: nn.Module, task_type: str, plan: LossHead) -> None:
        super().__init__()
        self.model = model
        self.task_type = task_type
        self.plan = plan

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.plan.path == "chunked":
            return chunked_loss_sum(self.plan, batch)
        return loss_sum(self.model, batch, self.task_type)[0]


__all__ = ["LOSS_HEAD_MODES", "LossForward", "LossHead", "choose_loss_head", "chunk_rows_for", "chunked_loss_sum",
           "head_loss_sum", "target_index"]
