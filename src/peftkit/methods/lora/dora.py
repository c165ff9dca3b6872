"""DoRA (Liu et al. 2024), weight-decomposed LoRA, as a variant object of a LoRA layer's adapter.

DoRA splits the adapted weight into a magnitude and a direction::

    W' = m · (W + s B A) / ||W + s B A||_row,        y = W' x + b
       = f ⊙ (W x + s B A x) + b,                     f = m / ||W + s B A||_row

with the norm treated as a constant (detached), ``m`` a learned vector initialised to ``||W||_row``
(``lora_magnitude_vector.<name>.weight`` in memory, ``lora_magnitude_vector`` in files). "Row"
means per output feature: rows of a linear weight (out, in), embedding dimensions of an embedding
table, output channels of a convolution.

A LoRA layer keeps one variant object per DoRA adapter (``layer.dora[name]``); plain LoRA adapters
have none. The variant changes three things of its adapter: the output (:meth:`DoraVariant.forward`),
merging (``W ← f ⊙ (W + s B A)``, the norm kept for an exact unmerge) and, for linear layers, the
per-row factors of mixed batches (:meth:`DoraLinear.row_factor`). The subclasses say how the norm is
taken and shaped for each layer type.

The norm costs a product ``B A`` and a pass over ``W`` on every forward. With weight caching on
(:class:`peftkit.helpers.DoraCaching`) and the layer in eval mode, :meth:`DoraVariant.norm` keeps it
in the magnitude module's ``_dora_cache`` (as Hugging Face PEFT names it), keyed by the storage and
version of every tensor it depends on; the cache is dropped when the layer runs with caching off and
whenever ``train()`` / ``eval()`` is called.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...core.caching import weight_caching_enabled
from ...quant import dequantize_weight

# ``layer`` below: the LoRA layer a variant belongs to, of the matching type (typed as a module: the
# layer module imports this one, not the reverse)
Layer = nn.Module


class DoraMagnitude(nn.Module):
    """The learned magnitude ``m`` of DoRA (in memory ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self._dora_cache: dict[str, tuple] = {}  # "norm" -> (key, norm); not part of the state dict

    def train(self, mode: bool = True) -> "DoraMagnitude":
        self._dora_cache.clear()
        return super().train(mode)


class DoraVariant:
    """DoRA for one adapter of one layer (see the module doc). Subclasses per layer type."""

    def __init__(self) -> None:
        self.merged_delta: Optional[torch.Tensor] = None  # what the merge added to the weight, for an exact unmerge

    @classmethod
    def create(cls, layer: Layer, name: str) -> "DoraVariant":
        """Initialise ``m = ||W||_row`` (B is zero: the adapter starts as a no-op) and return the variant."""
        with torch.no_grad():
            weight = dequantize_weight(layer.get_base_layer()).float()
            if any(t.is_meta for _, t in layer.adapter_param_items(name)):
                weight = weight.to("meta")  # low_cpu_mem_usage: the loaded state dict brings m
            norm = cls.weight_norm(layer, name, weight)
        layer.lora_magnitude_vector[name] = DoraMagnitude(norm.to(torch.float32))
        return cls()

    def norm(self, layer: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight_norm(...)`` detached; cached while weight caching is on and the layer is in eval
        mode (module doc)."""
        cache = layer.lora_magnitude_vector[name]._dora_cache
        if not weight_caching_enabled() or layer.training:
            if cache:
                cache.clear()
            return self.weight_norm(layer, name, weight).detach()
        base = layer.get_base_layer()
        tensors = [t for _, t in layer.adapter_param_items(name)] + list(base.parameters(recurse=False))
        scaling = layer.scaling[name]
        key = (weight.dtype, weight.device, tuple((t.data_ptr(), t._version) for t in tensors),
               (id(scaling), scaling._version) if isinstance(scaling, torch.Tensor) else scaling)
        hit = cache.get("norm")
        if hit is not None and hit[0] == key:
            return hit[1]
        value = self.weight_norm(layer, name, weight).detach()
        cache["norm"] = (key, value)
        return value

    @staticmethod
    def weight_norm(layer: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||_row`` for the base weight ``weight`` (in its own layout)."""
        raise NotImplementedError

    @staticmethod
    def factor_shape(layer: Layer, factor: torch.Tensor) -> torch.Tensor:
        """``f`` (per output feature) shaped to multiply the base weight."""
        raise NotImplementedError

    def merged_weight(self, layer: Layer, name: str, weight: torch.Tensor, new: torch.Tensor,
                      remember: bool = True) -> torch.Tensor:
        """The merged weight from the current ``weight`` and ``new = weight + s B A`` (float): ``weight +
        f ⊙ (W₀ + s B A) - W₀``, where ``W₀`` is the base weight before any adapter of the layer was
        merged (``weight`` less what those merges added, ``layer.merged_contribution()``). With no other
        adapter merged that is ``f ⊙ (W + s B A)``; with several it equals their forward, which computes
        each DoRA adapter on ``W₀``. Remembers what it adds (unless ``remember`` is false: safe_merge's
        check before merging), for :meth:`unmerged_weight`."""
        original = weight - layer.merged_contribution()
        norm = self.weight_norm(layer, name, original).detach()
        factor = self.factor_shape(layer, layer.lora_magnitude_vector[name].weight.float() / norm)
        added = factor * (original + (new - weight)) - original
        if remember:
            self.merged_delta = added
        return weight + added

    def unmerged_weight(self, layer: Layer, name: str, current: torch.Tensor) -> torch.Tensor:
        """``current - added + s B A`` (the caller then subtracts ``s B A``): the merge undone exactly."""
        added, self.merged_delta = self.merged_delta, None
        return current - added + layer.delta_weight(name)


class DoraLinear(DoraVariant):
    """DoRA on a linear map; the weight is (out, in), or (in, out) with ``fan_in_fan_out``."""

    @staticmethod
    def weight_norm(layer: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        w = weight.T if layer.fan_in_fan_out else weight
        lora_w = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()
        return torch.linalg.norm(w + layer.scaling[name] * lora_w.detach(), dim=1)

    @staticmethod
    def factor_shape(layer: Layer, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1) if layer.fan_in_fan_out else factor.view(-1, 1)

    def row_factor(self, layer: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``f`` (out,) for the base weight ``weight``: the per-row scale of mixed batches."""
        return layer.lora_magnitude_vector[name].weight / self.weight_norm(layer, name, weight).detach()

    def forward(self, layer: Layer, name: str, xd: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + (f - 1) ⊙ (W x) + f ⊙ s B A x`` for the base output ``result`` (bias included) and
        the adapter input ``xd`` (after dropout; in training with dropout the base term is recomputed on
        ``xd``, so that it sees the same dropout)."""
        base = layer.get_base_layer()
        weight = dequantize_weight(base)
        lora = layer.lora_B[name](layer.lora_A[name](xd))
        norm = self.norm(layer, name, weight.to(lora.dtype))
        f = layer.lora_magnitude_vector[name].weight / norm
        if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
            w = weight.T if layer.fan_in_fan_out else weight
            base_out = F.linear(xd, w.to(xd.dtype))
        else:
            base_out = result.to(lora.dtype)
            if getattr(base, "bias", None) is not None:
                base_out = base_out - base.bias.to(lora.dtype)
        return result + ((f - 1) * base_out + f * layer.scaling[name] * lora).to(result.dtype)


class DoraEmbedding(DoraVariant):
    """DoRA on an embedding table E (num, dim): ``y = f ⊙ (E[x] + s · A^T[x] B^T)``, f per dimension."""

    @staticmethod
    def weight_norm(layer: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        lora_w = layer.lora_embedding_B[name].float() @ layer.lora_embedding_A[name].float()  # (dim, num)
        return torch.linalg.norm(weight.T + layer.scaling[name] * lora_w.detach(), dim=1)

    @staticmethod
    def factor_shape(layer: Layer, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)

    def forward(self, layer: Layer, name: str, out: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``f ⊙ (result + out)`` for the base lookup ``result`` and the adapter's lookup ``out``."""
        weight = layer.get_base_layer().weight
        f = layer.lora_magnitude_vector[name].weight / self.norm(layer, name, weight.float())
        return (f * result.to(f.dtype) + f * out).to(result.dtype)


class DoraConv(DoraVariant):
    """DoRA on a convolution: ``f`` per output channel, the magnitude shaped (1, out, 1, ...)."""

    @staticmethod
    def weight_norm(layer: Layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        r = layer.r[name]
        lora_w = layer.lora_B[name].weight.float().view(-1, r) @ layer.lora_A[name].weight.float().view(r, -1)
        w = weight + layer.scaling[name] * lora_w.detach().reshape(weight.shape)
        dims = tuple(range(1, w.dim()))
        return w.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)  # (1, out, 1, ...)

    @staticmethod
    def factor_shape(layer: Layer, factor: torch.Tensor) -> torch.Tensor:
        return factor.transpose(0, 1)  # (out, 1, 1, ...) to scale the weight's rows

    def forward(self, layer: Layer, name: str, xa: torch.Tensor, lora: torch.Tensor,
                result: torch.Tensor) -> torch.Tensor:
        """``result + (f - 1) ⊙ conv(x, W) + f ⊙ s · lora`` (``lora`` the unscaled adapter output on
        ``xa``, the adapter input after dropout)."""
        base = layer.get_base_layer()
        norm = self.norm(layer, name, base.weight.to(lora.dtype))
        f = layer.lora_magnitude_vector[name].weight / norm
        if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
            base_out = layer.conv_fn(xa, base.weight.to(xa.dtype), None, base.stride, base.padding,
                                     base.dilation, base.groups)
        else:
            base_out = result.to(lora.dtype)
            if base.bias is not None:
                base_out = base_out - base.bias.to(lora.dtype).view(1, -1, *([1] * layer.conv_dim))
        return result + ((f - 1) * base_out + f * layer.scaling[name] * lora).to(result.dtype)


__all__ = ["DoraConv", "DoraEmbedding", "DoraLinear", "DoraMagnitude", "DoraVariant"]
