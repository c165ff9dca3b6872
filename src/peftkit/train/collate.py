"""Batches: padding (per architecture), generation prompts, and sequence packing.

Training batches are padded on the right for every architecture (the loss ignores padded positions
through ``labels = -100`` and ``attention_mask = 0``). Generation prompts are padded on the left for
decoder-only models, so that every row's next token follows its last prompt token, and on the right
for encoder-decoder models.

Packing (decoder-only models) concatenates whole examples into rows of ``max_length`` tokens. A packed
row has ``position_ids`` that restart at 0 for each example and no ``attention_mask``, and the forward
runs with ``use_cache=False``: transformers' mask functions (``masking_utils``, used by Llama, Mistral,
Qwen, Gemma, ... in transformers 5) then build a block-diagonal causal mask, so examples never attend
to each other. Models that ignore
``position_ids`` for masking would leak attention across examples; :func:`check_packing` detects that
on the actual model before training and refuses to pack it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional

import torch

from .data import IGNORE_INDEX, Example


def collate(examples: Sequence[Example], pad_id: int, task_type: str) -> dict[str, torch.Tensor]:
    """A right-padded training batch (``labels`` per token, or one class id per row)."""
    if examples and getattr(examples[0], "position_ids", None) is not None:
        return _collate_packed(examples, pad_id)
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if examples[0].token_type_ids is not None:
        tt = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(examples):
            tt[i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
        batch["token_type_ids"] = tt
    if task_type == "SEQ_CLS":
        batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
        return batch
    lwidth = max(len(e.labels) for e in examples)
    labels = torch.full((n, lwidth), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    batch["labels"] = labels
    return batch


def generation_batch(prompts: Sequence[Sequence[int]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Prompts padded on the left (decoder-only) or right (encoder-decoder), with the attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if left:
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        else:
            ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
            mask[i, : len(p)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class PackedRow(Example):
    """Several examples in one row; ``position_ids`` restart at each example."""

    def __init__(self, input_ids: list[int], labels: list[int], position_ids: list[int]) -> None:
        super().__init__(input_ids=input_ids, labels=labels)
        self.position_ids = position_ids


def pack(examples: Sequence[Example], max_length: int) -> list[PackedRow]:
    """Greedy packing in order: an example goes into the current row if it fits, else starts a new one."""
    rows: list[PackedRow] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for e in examples:
        n = len(e.input_ids)
        if ids and len(ids) + n > max_length:
            rows.append(PackedRow(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids += list(e.input_ids)
        # the first token of an example is never a target of the previous example's last token
        labels += [IGNORE_INDEX] + list(e.labels[1:])
        pos += list(range(n))
    if ids:
        rows.append(PackedRow(ids, labels, pos))
    return rows


def length_grouped(order: Sequence[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                   megabatch: int = 50) -> list[int]:
    """``order`` regrouped so that each global batch holds examples of similar lengths (less padding).

    As transformers' ``group_by_length``: ``order`` is cut into megabatches of ``megabatch * batch_size``
    examples, each sorted by length (longest first) and cut into batches; here the full batches of a
    megabatch are then shuffled with ``generator``, so long and short batches alternate through the epoch.
    """
    out: list[int] = []
    size = megabatch * batch_size
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches = [mega[k:k + batch_size] for k in range(0, len(mega), batch_size)]
        full = len(mega) // batch_size  # a last, incomplete batch stays last (the epoch drops it)
        for j in torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches))):
            out += batches[j]
    return out


def _collate_packed(rows: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        input_ids[i, :k] = torch.tensor(r.input_ids)
        labels[i, :k] = torch.tensor(r.labels)
        position_ids[i, :k] = torch.tensor(r.position_ids)
        # padding forms its own segment (positions restart at 0), attended by nothing real
        position_ids[i, k:] = torch.arange(width - k)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_matches_alone(model: Any, vocab_size: int, lengths: Sequence[int], device: Optional[torch.device] = None,
                        context: Any = None, **packed_kwargs: Any) -> bool:
    """Whether random sequences of ``lengths`` packed in one row (position ids restarting at 0) give, in
    eval mode and under ``context`` (a context manager) with ``packed_kwargs``, the logits each gives
    alone. Exceptions of the model propagate."""
    g = torch.Generator().manual_seed(0)
    device = device or next(model.parameters()).device
    seqs = [torch.randint(3, max(4, vocab_size), (1, n), generator=g).to(device) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=s, use_cache=False).logits.float() for s in seqs]
            with context if context is not None else contextlib.nullcontext():
                packed = model(input_ids=torch.cat(seqs, dim=1), position_ids=pos, use_cache=False,
                               **packed_kwargs).logits.float()
    finally:
        model.train(was_training)
    together = packed.split(list(lengths), dim=1)
    return all(a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(alone, together))


def check_packing(model: Any, vocab_size: int, device: Optional[torch.device] = None) -> Optional[str]:
    """None when ``model`` keeps packed examples apart, else why not: two short random sequences run
    separately and packed into one row give the same logits only if the second cannot see the first."""
    try:
        same = packed_matches_alone(model, vocab_size, (5, 7), device)
    except Exception as exc:  # a model that does not take position_ids
        return f"the model does not run packed rows ({type(exc).__name__}: {exc})"
    if not same:
        return "the model lets packed examples attend to each other (it ignores position_ids for masking)"
    return None
