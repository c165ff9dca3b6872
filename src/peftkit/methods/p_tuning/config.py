"""P-tuning v1's config (Hugging Face PEFT's ``PromptEncoderConfig``) and its encoder types."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

from ...config import PeftType, PromptLearningConfig, enum_field, positive_int, probability


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The P-tuning encoder."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning v1: virtual tokens produced by an MLP or bidirectional-LSTM encoder.

    Args:
        encoder_reparameterization_type: ``MLP`` or ``LSTM``.
        encoder_hidden_size: the encoder's hidden size ``h`` (default: ``token_dim``).
        encoder_num_layers: LSTM layers. The MLP always has 3 linear layers (as in Hugging Face
            PEFT; another value warns and is ignored).
        encoder_dropout: dropout between LSTM layers.
    """

    PEFT_TYPE = PeftType.P_TUNING

    encoder_reparameterization_type: Union[PromptEncoderReparameterizationType, str] = \
        PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        enum_field(self, "encoder_reparameterization_type", PromptEncoderReparameterizationType)
        if self.encoder_hidden_size is not None:
            positive_int(self, "encoder_hidden_size", self.encoder_hidden_size)
        positive_int(self, "encoder_num_layers", self.encoder_num_layers)
        probability(self, "encoder_dropout", self.encoder_dropout)


__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]
