"""Interpretability of input prompts: the vocabulary tokens nearest each virtual token."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterNameError, PeftkitError
from .virtual import adapter_tokens


@dataclass(frozen=True)
class NearestToken:
    """A vocabulary token near a virtual token (cosine similarity ``score`` in [-1, 1])."""

    token_id: int
    score: float
    token: Optional[str] = None


def nearest_tokens(peft: nn.Module, adapter_name: Optional[str] = None, k: int = 5, tokenizer: Any = None
                   ) -> list[list[NearestToken]]:
    """For each virtual token of an input-prompt adapter, the ``k`` vocabulary tokens whose input
    embeddings are nearest by cosine similarity, best first.

    ``tokenizer`` (an object or a path; default: the config's ``tokenizer_name_or_path``) adds
    the token strings. Prefix-tuning adapters hold keys/values, not embeddings: PeftkitError.
    """
    name = adapter_name or peft.active_adapters[0]
    if name not in peft.peft_config:
        raise AdapterNameError(f"Unknown adapter {name!r}; loaded adapters: {list(peft.peft_config)}.")
    config = peft.peft_config[name]
    if config.uses_kv_prefix:
        raise PeftkitError(f"Adapter {name!r} is prefix tuning: its virtual tokens are per-layer keys and values, "
                           "not word embeddings, so they have no nearest vocabulary tokens.")
    if not isinstance(k, int) or k <= 0:
        raise PeftkitError(f"k must be a positive integer, got {k!r}.")
    vocab = peft.word_embeddings.weight.detach().float()
    with torch.no_grad():
        prompt = adapter_tokens(peft, name).detach().float().to(vocab.device)
    sims = F.normalize(prompt, dim=-1, eps=1e-12) @ F.normalize(vocab, dim=-1, eps=1e-12).T
    scores, ids = sims.topk(min(k, vocab.shape[0]), dim=-1)
    tok = tokenizer
    if tok is None and getattr(config, "tokenizer_name_or_path", None) and os.path.isdir(
            config.tokenizer_name_or_path):
        tok = config.tokenizer_name_or_path
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok)
    out = []
    for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
        out.append([NearestToken(i, s, tok.convert_ids_to_tokens(i) if tok is not None else None)
                    for i, s in zip(row_ids, row_scores)])
    return out


__all__ = ["NearestToken", "nearest_tokens"]
