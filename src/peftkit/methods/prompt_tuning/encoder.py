"""Prompt tuning's encoder: the virtual tokens themselves, ``P = embedding.weight``, and their init
(RANDOM: N(0, 1); SAMPLE_VOCAB: embeddings of random vocabulary tokens; TEXT: embeddings of a text's
tokens, repeated or truncated to the prompt length, as Hugging Face PEFT)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...core.memory import check_new_tensors
from ...errors import ConfigError, PeftkitError
from .config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(nn.Module):
    """Prompt tuning: ``P = embedding.weight``, shape ``(n·submodules, token_dim)``."""

    reparameterized = False

    def __init__(self, total_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(total_tokens, token_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def make_encoder(config: PromptTuningConfig, word_embeddings: Optional[nn.Module], encoded: bool) -> PromptEmbedding:
    """The prompt of ``config`` (model-derived fields filled), initialised as it asks unless ``encoded``
    (loaded for inference: the file's values replace it)."""
    total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
    check_new_tensors(f"PromptTuningConfig(num_virtual_tokens={config.num_virtual_tokens})", [(total, config.token_dim)],
                      "cpu", "Use a smaller num_virtual_tokens")
    encoder = PromptEmbedding(total, config.token_dim)
    init = PromptTuningInit(str(config.prompt_tuning_init))
    if encoded or init == PromptTuningInit.RANDOM:
        return encoder
    if word_embeddings is None:
        raise PeftkitError(f"prompt_tuning_init={init.value} reads the model's input embeddings, which it does not "
                           "expose (get_input_embeddings()); use RANDOM.")
    total = encoder.embedding.num_embeddings
    vocab = word_embeddings.weight.shape[0]
    if init == PromptTuningInit.SAMPLE_VOCAB:
        ids = torch.randint(0, vocab, (total,), dtype=torch.long)
    else:
        ids = text_token_ids(config, total)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"The tokenizer {config.tokenizer_name_or_path!r} gives token ids {bad[:5]} outside "
                              f"the model's vocabulary of {vocab}; use the model's own tokenizer.")
        ids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        weight = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
    encoder.embedding.weight = nn.Parameter(weight.to(encoder.embedding.weight.device))
    return encoder


def text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The token ids of ``prompt_tuning_init_text``, repeated or truncated to ``total`` (Hugging Face rule)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Could not load the tokenizer {config.tokenizer_name_or_path!r} for TEXT init: {exc}") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens with "
                          f"{config.tokenizer_name_or_path!r}.")
    if len(ids) < total:
        ids = ids * -(-total // len(ids))
    return ids[:total]


__all__ = ["PromptEmbedding", "make_encoder", "text_token_ids"]
