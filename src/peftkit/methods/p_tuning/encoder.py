"""P-tuning v1's encoder: ``P = head(E_v)``, an MLP or bidirectional-LSTM reparameterization of free
embeddings ``E_v`` (in-memory structure and parameter names as Hugging Face PEFT)::

    MLP:  Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)
    LSTM: BiLSTM(d, h, layers) → Linear(2h, 2h) → ReLU → Linear(2h, d)
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ...core.memory import check_new_tensors
from ...errors import PeftkitWarning
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(nn.Module):
    """P-tuning: ``P = head(embedding.weight)`` (see the module docstring for the heads).

    With ``encoded=True`` (an adapter loaded for inference, as Hugging Face PEFT does) only
    ``embedding`` exists and holds the encoder's output.
    """

    def __init__(self, config: PromptEncoderConfig, total_tokens: int, encoded: bool = False) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.encoder_type = PromptEncoderReparameterizationType(str(config.encoder_reparameterization_type))
        self.embedding = nn.Embedding(total_tokens, d)
        self.reparameterized = not encoded
        if encoded:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("PromptEncoderConfig.encoder_num_layers is ignored by the MLP encoder, which always has "
                              "3 linear layers (as in Hugging Face PEFT).", PeftkitWarning, stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` (batch, n) -> prompts (batch, n, token_dim)."""
        x = self.embedding(indices)
        if not self.reparameterized:
            return x
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)


def make_encoder(config: PromptEncoderConfig, word_embeddings: Optional[nn.Module], encoded: bool) -> PromptEncoder:
    """The encoder of ``config`` (model-derived fields filled); ``encoded``: only its output (inference)."""
    total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
    d, h = config.token_dim, config.encoder_hidden_size or config.token_dim
    shapes = [(total, d)]
    if not encoded and str(config.encoder_reparameterization_type) == "LSTM":
        layers = range(2 * config.encoder_num_layers)  # two directions per layer
        shapes += [(4 * h, d if i < 2 else 2 * h) for i in layers] + [(4 * h, h) for i in layers]
        shapes += [(2 * h, 2 * h), (d, 2 * h)]
    elif not encoded:
        shapes += [(h, d), (h, h), (d, h)]
    check_new_tensors(f"PromptEncoderConfig(num_virtual_tokens={config.num_virtual_tokens}, encoder_hidden_size={h})",
                      shapes, "cpu", "Use a smaller num_virtual_tokens or encoder_hidden_size")
    return PromptEncoder(config, total, encoded=encoded)


__all__ = ["PromptEncoder", "make_encoder"]
