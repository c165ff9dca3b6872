"""The pieces of one training step: seeding, the summed loss and its count, autocast precision, and
AdamW with its warmup + linear/cosine/constant schedule (see :mod:`peftkit.train.loop` for how a step
uses them)."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PeftkitError
from .config import TrainConfig
from .data import IGNORE_INDEX
from .trainable import unwrap


def set_seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# loss


def batch_count(batch: dict[str, torch.Tensor], task_type: str) -> int:
    """Number of loss terms in a batch: target tokens (LMs) or rows (classification)."""
    labels = batch["labels"]
    if task_type == "SEQ_CLS":
        return int(labels.shape[0])
    if task_type == "CAUSAL_LM":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum())


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task_type: str) -> tuple[torch.Tensor, Any]:
    """(summed loss over the batch's targets, model output)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task_type != "SEQ_CLS":
        # no KV cache in training: it costs memory, and with one transformers ignores packed position_ids
        inputs["use_cache"] = False
    if task_type == "SEQ_2_SEQ_LM":
        base = unwrap(model)
        prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare):
            inputs["decoder_input_ids"] = prepare(labels=labels)
        else:
            inputs["labels"] = labels
    out = model(**inputs)
    logits = out.logits.float()
    if task_type == "SEQ_CLS":
        return F.cross_entropy(logits, labels, reduction="sum"), out
    if task_type == "CAUSAL_LM":
        if logits.shape[1] > labels.shape[1]:  # prompt methods prepend virtual tokens
            logits = logits[:, -labels.shape[1]:]
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum"), out


# ---------------------------------------------------------------------------------------------
# precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PeftkitError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PeftkitError("This GPU has no bf16; use --precision fp16 or fp32.")
    return precision


def grad_scaler(precision: str) -> Optional[torch.amp.GradScaler]:
    """The loss scaler fp16 needs; None for the other precisions."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


# ---------------------------------------------------------------------------------------------
# optimizer and schedule


def lr_lambda(total: int, warmup: int, kind: str):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


def build_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup (``warmup_steps``, else ``warmup_ratio`` of the steps), then ``config.scheduler``."""
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, config.scheduler))


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Optional[torch.amp.GradScaler],
                   params: list[nn.Parameter], max_grad_norm: Optional[float]) -> None:
    """Unscale (fp16), clip, step the optimizer and the schedule, and drop the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


__all__ = ["autocast_context", "batch_count", "build_optimizer", "build_scheduler", "grad_scaler", "loss_sum",
           "lr_lambda", "optimizer_step", "resolve_precision", "set_seed"]
