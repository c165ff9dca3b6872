"""The config of trainable tokens (field names and defaults as Hugging Face PEFT 0.21)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn

from ...config import PeftConfig, PeftType, as_list
from ...core.tying import input_embedding_key
from ...errors import ConfigError


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Config of trainable tokens: train chosen rows of the embedding table only.

    Args:
        token_indices: the tokens to train (distinct indices into the embedding, e.g. the ids of added
            special tokens); each adapter stores ``len(token_indices) x dim`` values. Required (the
            empty default of the Hugging Face class is refused when the adapter is created).
        target_modules: the embedding layer(s) (names, or a regex); ``None``: the model's input
            embedding (``get_input_embeddings()``, else ``embed_tokens``). With tied embeddings the
            output head follows the embedding's rows.
        init_weights: start from the current rows (``True``: a no-op until trained) or random values.
    """

    PEFT_TYPE = PeftType.TRAINABLE_TOKENS

    token_indices: list[int] = field(default_factory=list)
    target_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    def validate(self) -> None:
        self.target_modules = as_list(self.target_modules)
        self.token_indices = as_list(self.token_indices)
        if any(i < 0 for i in self.token_indices):
            raise ConfigError(f"TrainableTokensConfig.token_indices must be >= 0, got {self.token_indices!r}.")
        if len(set(self.token_indices)) != len(self.token_indices):
            raise ConfigError(f"TrainableTokensConfig.token_indices has repeated indices: {self.token_indices!r}.")


def prepare(config: TrainableTokensConfig, model: nn.Module) -> None:
    """Without target_modules: the model's input embedding (Hugging Face PEFT writes its key as the value)."""
    if config.target_modules is None:
        config.target_modules = input_embedding_key(model, "embed_tokens")


__all__ = ["TrainableTokensConfig", "prepare"]
