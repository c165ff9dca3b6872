"""Prefix tuning's encoder: the key/value prefixes of every layer as one matrix ``Z``, free (P-tuning v2)
or through the paper's MLP reparameterization ``Z = W₂·tanh(W₁·E_v + b₁) + b₂``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...core.memory import check_new_tensors
from .config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """Prefix tuning: ``Z = embedding.weight`` of shape ``(n, 2·L·token_dim)``, or with
    ``prefix_projection`` ``Z = transform(embedding.weight)`` with ``embedding`` ``(n, token_dim)``.

    Row ``t`` of ``Z`` viewed as ``(2·L, heads, head_dim)`` holds the key (``2l``) and value
    (``2l+1``) of virtual token ``t`` for layer ``l``. ``encoded=True`` keeps only ``embedding``
    holding ``Z`` (an adapter loaded for inference, as Hugging Face PEFT does).
    """

    def __init__(self, config: PrefixTuningConfig, encoded: bool = False) -> None:
        super().__init__()
        n, td, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.reparameterized = bool(config.prefix_projection) and not encoded
        if self.reparameterized:
            h = config.encoder_hidden_size or td
            self.embedding = nn.Embedding(n, td)
            self.transform = nn.Sequential(nn.Linear(td, h), nn.Tanh(), nn.Linear(h, layers * 2 * td))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, layers * 2 * td)
            if config.init_weights == "zero" and not encoded:
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.reparameterized else x


def make_encoder(config: PrefixTuningConfig, word_embeddings: Optional[nn.Module], encoded: bool) -> PrefixEncoder:
    """The encoder of ``config`` (model-derived fields filled); ``encoded``: only its output (inference)."""
    n, td, width = config.num_virtual_tokens, config.token_dim, config.num_layers * 2 * config.token_dim
    h = config.encoder_hidden_size or td
    shapes = [(n, td), (h, td), (width, h)] if config.prefix_projection and not encoded else [(n, width)]
    check_new_tensors(f"PrefixTuningConfig(num_virtual_tokens={n}, encoder_hidden_size={h})", shapes, "cpu",
                      "Use a smaller num_virtual_tokens or encoder_hidden_size")
    return PrefixEncoder(config, encoded=encoded)


__all__ = ["PrefixEncoder", "make_encoder"]
