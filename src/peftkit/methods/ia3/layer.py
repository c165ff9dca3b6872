"""(IA)³: infused adapters by inhibiting and amplifying inner activations (Liu et al. 2022).

A learned vector ``l`` (initialised to ones, so the adapter starts as a no-op) rescales each target:

* a feed-forward module (listed in ``feedforward_modules``) scales its **input**::

      y = W (x ⊙ l) + b,        l: (1, in)

* any other target (attention keys and values) scales its **output**, bias included::

      y = (W x + b) ⊙ l,        l: (out, 1)

Several active adapters multiply their vectors. Merging folds ``l`` into the weight
(``W ← W ⊙ l`` along the scaled axis, and ``b ← b ⊙ l`` for output scaling); unmerging divides it out
again, which is exact up to float rounding unless ``l`` has zero entries (those rows are lost and a
warning says so). A mixed batch gathers one vector per row from the stacked vectors (slot 0 is all
ones, "no adapter") and multiplies once, so it costs one elementwise product more than the base.

File format as Hugging Face PEFT: ``<module>.ia3_l`` with shape ``(out, 1)`` or ``(1, in)`` for linear
layers (transformers ``Conv1D`` included: the shapes are the same, the weight layout is handled by
``fan_in_fan_out``) and ``(1, channels, 1, ...)`` for convolutions. Which targets are feed-forward
follows Hugging Face's rule: a regex string must match the whole module name, a list entry matches
when the module name ends with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ...core.dispatch import CONV_TYPES, linear_fan_in_fan_out, wrapped_module
from ...core.layer import AdapterLayer, check_merged_finite
from ...core.mixed import MixedBatch
from ...errors import MergeError, PeftkitWarning, TargetError
from .config import IA3Config, is_feedforward


class IA3Layer(AdapterLayer):
    """Shared bookkeeping of (IA)³ layers: one vector ``ia3_l[name]`` per adapter (see module doc)."""

    adapter_layer_names = ("ia3_l",)
    stackable = True

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward

    def _vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: IA3Config, key: str) -> None:
        if is_feedforward(config, key) != self.is_feedforward:
            kind = "a feed-forward" if self.is_feedforward else "not a feed-forward"
            raise TargetError(
                f"{key} is {kind} module for the adapters it already has ({self.adapter_names}) but not for "
                f"{adapter_name!r}; (IA)³ adapters on one module must agree on feedforward_modules."
            )
        shape = self._vector_shape()
        device = self._adapter_device()
        if config.init_ia3_weights:
            value = torch.ones(shape, device=device)
        else:
            value = torch.randn(shape, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(value)

    def _active_vectors(self) -> list[torch.Tensor]:
        return [self.ia3_l[n] for n in self.active_adapters if n in self.ia3_l and n not in self.merged_adapters]

    def _product(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        out = vectors[0]
        for v in vectors[1:]:
            out = out * v
        return out

    # forward ---------------------------------------------------------------------------------
    def _broadcast(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """A (dim,) vector shaped to multiply a tensor of ``ndim`` dims along the scaled axis."""
        raise NotImplementedError

    def _rows(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """A (batch, dim) matrix shaped to multiply a (batch, ...) tensor row by row."""
        raise NotImplementedError

    def _active_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        vectors = self._active_vectors()
        if not vectors:
            return self.base_layer(x, *args, **kwargs)
        scale = self._product(vectors).flatten()
        if self.is_feedforward:
            scaled = (x.to(scale.dtype) * self._broadcast(scale, x.dim())).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * self._broadcast(scale, result.dim())).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, mixed: MixedBatch) -> torch.Tensor:
        """Row i is scaled by the vector of its adapter: one gather of the stacked vectors, one product."""
        names = tuple(self.ia3_l.keys())
        if not names:
            return self.base_layer(x, *args, **kwargs)
        first = self.ia3_l[names[0]]
        stacked = torch.stack([torch.ones(first.numel(), device=first.device, dtype=first.dtype)]
                              + [self.ia3_l[n].flatten() for n in names])  # (n+1, dim), slot 0: no adapter
        idx = mixed.index(names, x.device, x.shape[0])
        rows = stacked.to(x.device).index_select(0, idx)  # (batch, dim)
        if self.is_feedforward:
            scaled = (x.to(rows.dtype) * self._rows(rows, x.dim())).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * self._rows(rows, result.dim())).to(result.dtype)

    # merging ---------------------------------------------------------------------------------
    def _weight_factor(self, v: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply the base weight."""
        raise NotImplementedError

    def _merged(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base weight and bias (float) with ``name``'s vector folded in (the bias: output scaling only)."""
        v = self.ia3_l[name].detach().float()
        weight = weight * self._weight_factor(v)
        if not self.is_feedforward and bias is not None:
            bias = bias * v.flatten()
        return weight, bias

    def _check_finite(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        base = self.get_base_layer()
        check_merged_finite(name, weight, bias, base.weight.dtype, base.bias.dtype if bias is not None else None)

    def _float_bias(self) -> Optional[torch.Tensor]:
        bias = getattr(self.get_base_layer(), "bias", None)
        return bias.float() if bias is not None and not self.is_feedforward else None

    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """As :meth:`AdapterLayer.check_merge`; with ``safe_merge`` the merged weights are computed and checked."""
        super().check_merge(adapter_names)
        names = self.adapters_to_merge(adapter_names)
        if names and getattr(self.get_base_layer(), "is_quantized_linear", False):
            raise MergeError("(IA)³ vectors cannot be merged into a quantized base layer.")
        if not safe_merge or not names:
            return
        weight, bias = self.get_base_layer().weight.detach().float(), self._float_bias()
        for name in names:
            weight, bias = self._merged(name, weight, bias)
            self._check_finite(name, weight, bias)

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        weight, bias = self._merged(name, base.weight.detach().float(), self._float_bias())
        if safe_merge:
            self._check_finite(name, weight, bias)
        with torch.no_grad():
            base.weight.copy_(weight.to(base.weight.dtype))
            if bias is not None:
                base.bias.copy_(bias.to(base.bias.dtype))

    def _unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        v = self.ia3_l[name].detach().float()
        if (v == 0).any():
            warnings.warn(f"(IA)³ adapter {name!r} has zero entries; the weights they scaled to zero cannot be "
                          "restored by unmerging.", PeftkitWarning, stacklevel=3)
        v = torch.where(v == 0, torch.ones_like(v), v)
        with torch.no_grad():
            base.weight.copy_((base.weight.float() / self._weight_factor(v)).to(base.weight.dtype))
            if not self.is_feedforward and getattr(base, "bias", None) is not None:
                base.bias.copy_((base.bias.float() / v.flatten()).to(base.bias.dtype))

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, " + super().extra_repr()


class Linear(IA3Layer):
    """(IA)³ on a linear map (``nn.Linear``; transformers ``Conv1D`` with ``fan_in_fan_out``).

    Shapes: x (..., in) -> y (..., out); ``l`` is (1, in) for feed-forward targets, else (out, 1).
    The base weight is (out, in), or (in, out) with ``fan_in_fan_out``.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, is_feedforward)
        base = self.get_base_layer()
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:  # transformers Conv1D: weight (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def _vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _broadcast(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v  # the scaled axis is the last one

    def _rows(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(v.shape[0], *([1] * (ndim - 2)), v.shape[1])

    def _weight_factor(self, v: torch.Tensor) -> torch.Tensor:
        return v.T if self.fan_in_fan_out else v


class ConvNd(IA3Layer):
    """(IA)³ on ``nn.Conv1d/2d/3d``: ``l`` is (1, channels, 1, ...), scaling the input channels
    (feed-forward) or the output channels (otherwise)."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer, is_feedforward)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self._conv_dim = base.weight.dim() - 2

    def _vector_shape(self) -> tuple[int, ...]:
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * self._conv_dim

    def _broadcast(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(1, -1, *([1] * (ndim - 2)))

    def _rows(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(v.shape[0], v.shape[1], *([1] * (ndim - 2)))

    def _weight_factor(self, v: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if not self.is_feedforward:
            return v.transpose(0, 1)  # (out, 1, 1, ...)
        if base.groups == 1:
            return v  # (1, in, 1, ...)
        # grouped conv: weight (out, in/groups, k...); output channel o sees input group o // (out/groups)
        g, per_in, per_out = base.groups, base.in_channels // base.groups, base.out_channels // base.groups
        v = v.reshape(g, 1, per_in, *v.shape[2:]).expand(g, per_out, per_in, *v.shape[2:])
        return v.reshape(base.out_channels, per_in, *v.shape[3:])


def make_layer(target: nn.Module, config: IA3Config, adapter_name: str, key: str) -> IA3Layer:
    """The (IA)³ layer for ``target`` (a linear map, transformers Conv1D or a convolution)."""
    ff = is_feedforward(config, key)
    kind = wrapped_module(target)  # another method's adapter layer on the module: the new layer wraps it
    fan_in_fan_out = linear_fan_in_fan_out(kind, config.fan_in_fan_out)
    if isinstance(kind, CONV_TYPES):
        layer: IA3Layer = ConvNd(target, ff)
    elif fan_in_fan_out is not None:
        layer = Linear(target, ff, fan_in_fan_out=fan_in_fan_out)
    else:
        raise TargetError(
            f"Target module {key} ({type(kind).__name__}) is not supported by (IA)³. Supported: nn.Linear, "
            "transformers Conv1D, nn.Conv1d/2d/3d; target its linear submodules instead."
        )
    layer.update_layer(adapter_name, config, key)
    return layer


__all__ = ["ConvNd", "IA3Layer", "Linear", "make_layer"]
