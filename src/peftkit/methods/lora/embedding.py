"""LoRA on embedding tables (``nn.Embedding``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.mixed import MixedBatch
from ...errors import PeftkitError, TargetError
from .config import LoraConfig
from .dora import DoraEmbedding
from .layer import LoraLayer


class Embedding(LoraLayer):
    """LoRA on an embedding table E (num_embeddings x dim)::

        y = E[x] + s · (A^T[x]) B^T,    A (r, num_embeddings) zeros, B (dim, r) ~ N(0, 1)

    DoRA: ``y = f ⊙ (E[x] + s · A^T[x] B^T)`` with ``f = m / ||E^T + s B A||_row`` per embedding
    dimension. ``lora_embedding_A`` / ``lora_embedding_B`` are plain parameters (no ``.weight`` in
    their keys).
    """

    dora_variant = DoraEmbedding

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        if config.lora_bias:
            raise TargetError("lora_bias=True is not supported on embedding layers.")
        device = self._adapter_device()
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=device))

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).T * self.scaling[name]

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        after_a = self._lookup(x, self.lora_embedding_A[name].T)
        out = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if scale is not None:
            out = out * scale
        if name in self.dora:
            return self.dora[name].forward(self, name, out, result)
        return result + out.to(result.dtype)

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        """Rows gather their adapter's A columns for their tokens, then one batched matmul with B."""
        names = tuple(self.lora_embedding_A.keys())
        if not names:
            return result
        if any(self.use_dora[n] for n in names):
            raise PeftkitError("Mixed-adapter batches are not supported for DoRA on embedding layers.")
        idx = mixed.index(names, x.device, x.shape[0])
        r_max = max(self.r[n] for n in names)
        dtype = self.lora_embedding_A[names[0]].dtype
        A = torch.stack([torch.zeros(self.in_features, r_max, device=x.device, dtype=dtype)]
                        + [F.pad(self.lora_embedding_A[n].T, (0, r_max - self.r[n])) for n in names])
        B = torch.stack([torch.zeros(r_max, self.out_features, device=x.device, dtype=dtype)]
                        + [F.pad(self.lora_embedding_B[n].T * self.scaling[n], (0, 0, 0, r_max - self.r[n]))
                           for n in names])
        rows = idx.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
        after_a = A[rows, x].reshape(x.shape[0], -1, r_max)  # (batch, tokens, r)
        out = torch.bmm(after_a, B.index_select(0, idx)).view(*x.shape, self.out_features)
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if scale is not None:
            out = out * scale
        return result + out.to(result.dtype)


__all__ = ["Embedding"]
