"""Prompt tuning's config (Hugging Face PEFT's fields) and its init choices."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

from ...config import PeftType, PromptLearningConfig, enum_field
from ...errors import ConfigError


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning initialises its virtual tokens."""

    TEXT = "TEXT"  # the embeddings of a text's tokens (repeated / truncated to the prompt length)
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the embeddings of tokens sampled uniformly from the vocabulary
    RANDOM = "RANDOM"  # N(0, 1), the nn.Embedding default

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``n`` free virtual-token embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``RANDOM`` (N(0,1)), ``SAMPLE_VOCAB`` (embeddings of random vocabulary
            tokens) or ``TEXT`` (embeddings of ``prompt_tuning_init_text``'s tokens, repeated or
            truncated to the prompt length).
        prompt_tuning_init_text: the text for ``TEXT`` init.
        tokenizer_name_or_path: a tokenizer (a local folder works) for ``TEXT`` init.
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (``trust_remote_code`` is
            dropped: loading never executes code).
    """

    PEFT_TYPE = PeftType.PROMPT_TUNING

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def validate(self) -> None:
        super().validate()
        enum_field(self, "prompt_tuning_init", PromptTuningInit)
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a "
                                  "tokenizer name or a local tokenizer folder).")
            if self.prompt_tuning_init_text is None or not self.prompt_tuning_init_text.strip():
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs a non-empty "
                                  "prompt_tuning_init_text.")
        elif self.tokenizer_kwargs:
            raise ConfigError("PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT'.")


__all__ = ["PromptTuningConfig", "PromptTuningInit"]
