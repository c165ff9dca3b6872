"""The fused training road of LoRA's ``Linear``: base and adapter in one autograd node.

With a gradient recorded, a LoRA linear layer with one active adapter computes::

    y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ + s · b_B,     x̃ = x ⊙ m / (1 - p)   (dropout; x̃ = x without it)

as one :class:`FusedLoraLinear` node instead of autograd's five or six (base linear, dropout, two
adapter products, scale, add). It saves x (N, in), the rank-r product h = x̃ Aᵀ (N, r: r/in of x),
the dropout mask m as bools (the plain path saves x̃ in the input's dtype) and the weights; the
backward of an incoming gradient g (N, out) is::

    g_h = s · g B                       (N, r)
    dB  = s · gᵀ h,   dA = g_hᵀ x̃,   db_B = s · Σ_rows g
    dx  = g W + g_h A                   (one addmm; with dropout: g W + (g_h A) ⊙ m / (1 - p))
    dW  = gᵀ x,  db = Σ_rows g          (only when the base is trained)

The dropout mask is drawn as ``nn.Dropout`` draws it on that device (a Bernoulli tensor on a CPU,
``native_dropout`` on a GPU), so the outputs and gradients are the plain path's under the same seed.

The road is opt-in (:func:`set_fused_training`); a call does not take it for: more than one active adapter,
DoRA, a sparsity mask, a tensor scaling (hot-swapping), ``fan_in_fan_out`` bases, a base that is not
an exact hook-free ``nn.Linear`` (quantized bases among them), inputs whose dtype differs from the
weights', autocast, mixed-adapter batches, extra arguments; those take the general path.
:func:`fallback_reason` names the case for a layer (the run's report counts them).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...core import mixed as _mixed
from ...core.base_call import plain_linear_params
from .layer import LoraLayer

_autocast = torch._C._is_any_autocast_enabled


class FusedLoraLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + s (x̃ Aᵀ) Bᵀ + s b_B`` (module doc), x (..., in) -> y (..., out)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, b_bias: Optional[torch.Tensor], scaling: float, p: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        mask, xd = None, x2
        if p > 0.0:
            if x2.is_cuda:
                xd, mask = torch.native_dropout(x2, p, True)
            else:  # as torch.dropout on a CPU: a Bernoulli tensor of keep draws, scaled by 1 / (1 - p)
                noise = torch.empty_like(x2).bernoulli_(1 - p)
                noise.div_(1 - p)
                xd = x2 * noise
                mask = noise != 0
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        h = torch.mm(xd, A.t())
        lora_bias = None if b_bias is None else b_bias * scaling
        if lora_bias is not None:
            out = out + lora_bias
        out.addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, weight, A, B, mask)
        ctx.scaling, ctx.p, ctx.shape = scaling, p, shape
        ctx.has_bias, ctx.has_b_bias = bias is not None, b_bias is not None
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x2, h, weight, A, B, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        g = grad.reshape(-1, weight.shape[0])
        need = ctx.needs_input_grad
        g_h = torch.mm(g, B).mul_(s)  # (N, r)
        dx = dw = db = dA = dB = db_b = None
        if need[0]:
            if mask is None:
                dx = torch.addmm(torch.mm(g, weight), g_h, A)
            else:
                dx = torch.mm(g, weight).add_(torch.mm(g_h, A).mul_(mask).mul_(1.0 / (1 - p)))
            dx = dx.view(ctx.shape)
        if need[1]:
            dw = torch.mm(g.t(), x2)
        if need[2] and ctx.has_bias:
            db = g.sum(0)
        if need[3]:
            xd = x2 if mask is None else x2 * (mask.to(x2.dtype) / (1 - p))
            dA = torch.mm(g_h.t(), xd)
        if need[4]:
            dB = torch.mm(g.t(), h).mul_(s)
        if need[5] and ctx.has_b_bias:
            db_b = g.sum(0).mul_(s)
        return dx, dw, db, dA, dB, db_b, None, None


def fallback_reason(layer: LoraLayer) -> Optional[str]:
    """None when ``layer``'s training calls can take the fused road (with its input in the weights'
    dtype, no autocast), else the case that keeps it on the general path."""
    if layer.fan_in_fan_out:
        return "fan_in_fan_out (Conv1D) base"
    if plain_linear_params(layer.get_base_layer()) is None or layer.base_layer is not layer.get_base_layer():
        return "base is not a plain nn.Linear (quantized, hooked or nested)"
    if "delta_mask" in layer._buffers:
        return "sparsity mask"
    names = [n for n in layer.active_adapters if n in layer.r]
    if len(names) != 1:
        return f"{len(names)} active adapters"
    name = names[0]
    if layer.use_dora.get(name):
        return "DoRA"
    if isinstance(layer.scaling[name], torch.Tensor):
        return "tensor scaling (hot-swap)"
    return None


def forward(layer: LoraLayer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The fused road's output for ``layer(x)``, or None when this call does not take it."""
    d = layer.__dict__
    if d["disabled"] or d["merged_adapters"] or _mixed.open_count or _autocast() or type(x) is not torch.Tensor:
        return None
    names = d["active_adapters"]
    if len(names) != 1 or fallback_reason(layer) is not None:
        return None
    name = names[0]
    modules = d["_modules"]
    params = modules["base_layer"]._parameters
    A = modules["lora_A"]._modules[name]._parameters["weight"]
    b_params = modules["lora_B"]._modules[name]._parameters
    weight = params["weight"]
    if not (x.dtype is A.dtype is weight.dtype is b_params["weight"].dtype):
        return None
    dropout = modules["lora_dropout"]._modules[name]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return FusedLoraLinear.apply(x, weight, params["bias"], A, b_params["weight"], b_params["bias"],
                                 float(d["scaling"][name]), p)


def set_fused_training(model: nn.Module, enabled: bool = True) -> dict[str, int]:
    """Turn the fused training road on (or off) for every LoRA ``Linear`` of ``model`` (the classes
    with ``fused_road = True``, whose forward takes it); returns the
    count of layers per case: ``"fused"`` or the fallback reason of :func:`fallback_reason`."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer) and getattr(type(module), "fused_road", False):
            module.fused_training = enabled
            reason = fallback_reason(module) if enabled else "fusing off"
            key = "fused" if reason is None else reason
            counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = ["FusedLoraLinear", "fallback_reason", "forward", "set_fused_training"]
