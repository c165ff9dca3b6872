"""Evaluation and generation: the eval metrics of a model on a dataset, greedy completions, and the
before/after samples a training run prints."""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import nn

from ..errors import PeftkitError
from .collate import collate, generation_batch
from .data import Dataset
from .distributed import DistInfo, all_reduce_sum
from .loss_head import LossHead, chunked_loss_sum
from .metrics import MetricSums
from .step import autocast_context, batch_count, loss_sum
from .trainable import unwrap


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: list[list[int]], task_type: str, device: torch.device,
                   max_new_tokens: int = 48, batch_size: int = 16, adapter_names: Optional[list[str]] = None,
                   precision: str = "fp32") -> list[str]:
    """Greedy completions of tokenized prompts (left-padded for decoder-only models)."""
    m = unwrap(model)
    check_context(m, prompts, max_new_tokens, task_type)
    was = m.training
    m.eval()
    out: list[str] = []
    left = task_type == "CAUSAL_LM"
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            batch = {k: v.to(device) for k, v in generation_batch(chunk, tokenizer.pad_token_id, left).items()}
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
            if adapter_names is not None:
                kwargs["adapter_names"] = adapter_names[i:i + batch_size]
            with autocast_context(precision, device):
                ids = m.generate(**batch, **kwargs)
            if left:
                ids = ids[:, batch["input_ids"].shape[1]:]
            out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    finally:
        m.train(was)
    return out


def check_context(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, task_type: str) -> None:
    """PeftkitError when the longest prompt plus ``max_new_tokens`` is more than a decoder's context
    (``max_position_embeddings``): generating past it would run long and degrade or fail."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) if task_type == "CAUSAL_LM" else None
    longest = max((len(p) for p in prompts), default=0)
    if isinstance(context, int) and longest + max_new_tokens > context:
        raise PeftkitError(f"a prompt of {longest} tokens plus --max-new-tokens {max_new_tokens} is more than the "
                           f"model's context of {context} tokens; use --max-new-tokens {max(1, context - longest)} "
                           "or less.")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, tokenizer: Any, *, task_type: str, device: torch.device,
             batch_size: int = 16, generate_samples: int = 0, max_new_tokens: int = 48, precision: str = "fp32",
             dist_info: Optional[DistInfo] = None, loss_head: Optional[LossHead] = None) -> dict[str, float]:
    """Loss (+ perplexity), accuracy/F1 or exact match/ROUGE-L of ``model`` on ``dataset``.

    ``loss_head``: a run's :class:`~peftkit.train.loss_head.LossHead`; when chunked, the loss is taken
    through it (the LM head only at target positions; the same loss).

    Under data parallelism each process scores every ``world_size``-th example and the sums are
    all-reduced, so every process gets the numbers of the whole set.
    """
    info = dist_info or DistInfo(device=device)
    m = unwrap(model)
    was = m.training
    m.eval()
    sums = MetricSums(len(dataset.label_names) if task_type == "SEQ_CLS" and dataset.label_names else None)
    mine = [ex for i, ex in enumerate(dataset.examples) if i % info.world_size == info.rank]
    try:
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in collate(mine[i:i + batch_size], tokenizer.pad_token_id, task_type).items()}
            with autocast_context(precision, device):
                if loss_head is not None and loss_head.path == "chunked":
                    loss, out = chunked_loss_sum(loss_head, batch), None
                else:
                    loss, out = loss_sum(m, batch, task_type)
            sums.loss_sum += float(loss)
            sums.count += batch_count(batch, task_type)
            if task_type == "SEQ_CLS":
                sums.add_classification(out.logits.argmax(-1), batch["labels"])
        if generate_samples and dataset.is_generation:
            chosen = [ex for ex in dataset.examples[:generate_samples] if ex.prompt_ids is not None]
            chosen = [ex for i, ex in enumerate(chosen) if i % info.world_size == info.rank]
            if chosen:
                preds = generate_texts(m, tokenizer, [ex.prompt_ids for ex in chosen], task_type, device,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision)
                for ex, pred in zip(chosen, preds):
                    sums.add_generation(pred, ex.reference or "")
    finally:
        m.train(was)
    if info.enabled:
        sums.load_tensor(all_reduce_sum(sums.as_tensor(), info))
    return sums.result(task_type)


def sample_outputs(model: nn.Module, dataset: Dataset, tokenizer: Any, task_type: str, device: torch.device,
                   n: int, max_new_tokens: int, precision: str = "fp32") -> list[tuple[str, str, str]]:
    """(input, reference, model output) for the first ``n`` eval examples."""
    if n <= 0 or not dataset.examples:
        return []
    examples = dataset.examples[:n]
    if task_type == "SEQ_CLS":
        m = unwrap(model)
        was = m.training
        m.eval()
        with torch.no_grad():
            batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id, task_type).items()}
            batch.pop("labels")
            with autocast_context(precision, device):
                pred = m(**batch).logits.argmax(-1).tolist()
        m.train(was)
        names = dataset.label_names or []
        return [(tokenizer.decode(e.input_ids, skip_special_tokens=True), names[e.labels], names[p])
                for e, p in zip(examples, pred)]
    if dataset.is_generation:
        prompts = [e.prompt_ids for e in examples]
        refs = [e.reference or "" for e in examples]
    else:  # text: continue the first tokens of each example
        prompts = [e.input_ids[: min(8, len(e.input_ids) - 1)] for e in examples]
        refs = [tokenizer.decode(e.input_ids[len(p):], skip_special_tokens=True)[:200] for e, p in zip(examples, prompts)]
    outs = generate_texts(model, tokenizer, prompts, task_type, device, max_new_tokens=max_new_tokens,
                          precision=precision)
    return [(tokenizer.decode(p, skip_special_tokens=True), r, o) for p, r, o in zip(prompts, refs, outs)]


def print_samples(title: str, samples: list[tuple[str, str, str]], task_type: str) -> None:
    if not samples:
        return
    print(f"== {title}")
    for i, (inp, ref, out) in enumerate(samples, 1):
        inp = " ".join(inp.split())
        print(f"  [{i}] input:     {inp[:300]}")
        print(f"      reference: {' '.join(ref.split())[:300]}")
        print(f"      {'predicted' if task_type == 'SEQ_CLS' else 'generated'}: {' '.join(out.split())[:300]}")
    sys.stdout.flush()


__all__ = ["evaluate", "generate_texts", "print_samples", "sample_outputs"]
