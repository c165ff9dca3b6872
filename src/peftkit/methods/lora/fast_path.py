"""The no-grad road of LoRA's ``Linear``: the plain case in the fewest PyTorch calls.

Without autograd (``torch.no_grad``, ``inference_mode``, ``generate``), in the plain case, a LoRA
linear layer computes the same math as its general path in fewer calls (what a CPU decode step
pays for): the input as one 2-D matrix, ``mm`` / ``addmm`` on transposed views of the weights kept
between calls, each adapter added into the base output inside its second GEMM::

    out = x Wᵀ (+ b);   out += s · (x Aᵀ) Bᵀ   (each active adapter)

``F.linear`` runs these same kernels, so the output is the general path's. The views are kept in a
:class:`RoadPlan` (``layer._road``), made by :func:`plan_road` and checked on every call: making a
view costs about as much as a thin GEMM's call. A weight given new storage (``param.data = ...``, a
reload with ``assign=True``) has a new data pointer, so the plan is made anew; ``.to()`` and friends
drop it (``LoraLayer._apply``), as does ``clear_cache``.

Plain means: no extra arguments, not disabled, nothing merged, no mixed batch open, no autograd, a
plain ``torch.Tensor`` input, no autocast, not compiling or tracing, an exact ``nn.Linear`` base with
no hooks (its own or global), no instance-level ``forward`` and no compiled wrapper, and the base
weight and every active adapter's weights in the input's dtype with no DoRA, no ``lora_bias`` and a
number as scaling (not the tensor of ``prepare_model_for_compiled_hotswap``), no sparsity mask; dropout only
in eval mode. Anything else takes the general path (:meth:`LoraLayer.forward`).

:func:`forward` is ``Linear.forward`` itself (assigned in the class body, so the road costs no call
level of its own): it reads the layer's state from its ``__dict__``, as ``nn.Module`` attribute
reads are several times slower than dict reads.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ...core import mixed as _mixed
from ...core.base_call import tracing_state
from . import fused
from .layer import LoraLayer

_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_autocast = torch._C._is_any_autocast_enabled
_PLAIN = (nn.Parameter, torch.Tensor)  # not quantized or distributed tensor types


class RoadAdapter(NamedTuple):
    """One active adapter on the road: its name, A's data pointer and Aᵀ, B's and Bᵀ, and its
    dropout module (None for ``nn.Identity``; the road is left while it is in training mode)."""

    name: str
    a_ptr: int
    at: torch.Tensor
    b_ptr: int
    bt: torch.Tensor
    dropout: Optional[nn.Module]


class RoadPlan:
    """What the road needs, kept between calls: the active adapters it was made for, the dtype
    (None: the road is closed for this layer), ``in_features``, the base weight's data pointer and
    Wᵀ, and the :class:`RoadAdapter` entries."""

    __slots__ = ("names", "dtype", "in_features", "weight_ptr", "wt", "adapters")

    def __init__(self, names: list[str], dtype: Optional[torch.dtype], in_features: int, weight_ptr: int,
                 wt: Optional[torch.Tensor], adapters: tuple[RoadAdapter, ...]) -> None:
        self.names = names
        self.dtype = dtype
        self.in_features = in_features
        self.weight_ptr = weight_ptr
        self.wt = wt
        self.adapters = adapters


def plan_road(layer: LoraLayer) -> RoadPlan:
    """The plan for ``layer``'s active adapters, kept as ``layer._road`` unless the weights are on
    the meta device (data pointer 0: a later load must plan anew). Only used without autograd
    (views made in inference mode must not meet it)."""
    names = list(layer.active_adapters)
    base = layer.get_base_layer()
    dtype, w_ptr, wt, adapters = None, 0, None, []
    if type(base) is nn.Linear and layer.base_layer is base and type(base.weight) in _PLAIN \
            and "delta_mask" not in layer._buffers:  # a sparsity-masked layer forms ΔW: the general path
        W = base.weight
        dtype, w_ptr, wt = W.dtype, W.data_ptr(), W.t()
        for name in names:
            if name not in layer.r:
                continue
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            if (layer.use_dora[name] or layer.lora_bias[name] or A.dtype is not dtype or B.dtype is not dtype
                    or type(A) not in _PLAIN or type(B) not in _PLAIN or isinstance(layer.scaling[name], torch.Tensor)):
                dtype = None
                break
            dropout = layer.lora_dropout[name]
            adapters.append(RoadAdapter(name, A.data_ptr(), A.t(), B.data_ptr(), B.t(),
                                        None if isinstance(dropout, nn.Identity) else dropout))
    plan = RoadPlan(names, dtype if w_ptr else None, layer.in_features, w_ptr, wt, tuple(adapters))
    if w_ptr:
        layer._road = plan
    return plan


def forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Linear.forward``: the road when the call is plain (module doc), else :meth:`LoraLayer.forward`."""
    d = self.__dict__
    if not (args or kwargs or d["disabled"] or d["merged_adapters"] or _mixed.open_count or _grad_enabled()
            or type(x) is not torch.Tensor or _autocast() or _compiling() or tracing_state()):
        plan = d["_road"]
        if plan is None or plan.names != d["active_adapters"]:
            plan = plan_road(self)
        modules = d["_modules"]
        base = modules["base_layer"].__dict__
        shape = x.shape
        # the base's forward would be just F.linear: core.base_call.plain_linear_params's conditions,
        # inlined (the call costs more than the checks), less the backward hooks, which cannot
        # fire without autograd (JIT tracing is checked above)
        if (plan.dtype is x.dtype and shape and shape[-1] == plan.in_features
                and not (base["_forward_pre_hooks"] or base["_forward_hooks"]
                         or _torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks)
                and "forward" not in base and base.get("_compiled_call_impl") is None):
            params = base["_parameters"]
            mods_a, mods_b, scaling = modules["lora_A"]._modules, modules["lora_B"]._modules, d["scaling"]
            current = params["weight"].data_ptr() == plan.weight_ptr  # False: a weight has new storage
            for name, a_ptr, _, b_ptr, _, dropout in plan.adapters:
                if not current or (dropout is not None and dropout.training):
                    break
                current = (mods_a[name]._parameters["weight"].data_ptr() == a_ptr
                           and mods_b[name]._parameters["weight"].data_ptr() == b_ptr)
            else:
                if current:
                    n_dim, k = len(shape), plan.in_features
                    x2 = (x if n_dim == 2 else x.reshape(shape[0] * shape[1], k) if n_dim == 3
                          else x.reshape(math.prod(shape[:-1]), k))
                    bias = params["bias"]
                    out = torch.mm(x2, plan.wt) if bias is None else torch.addmm(bias, x2, plan.wt)
                    for name, _, at, _, bt, _ in plan.adapters:
                        out.addmm_(torch.mm(x2, at), bt, alpha=scaling[name])
                    if n_dim == 2:
                        return out
                    if n_dim == 3:
                        return out.view(shape[0], shape[1], d["out_features"])
                    return out.view(*shape[:-1], d["out_features"])
            if not current:
                d["_road"] = None  # plan anew on the next call
    elif d.get("fused_training") and not (args or kwargs) and _grad_enabled():
        out = fused.forward(self, x)  # the fused training road (None: this call does not take it)
        if out is not None:
            return out
    return LoraLayer.forward(self, x, *args, **kwargs)


__all__ = ["RoadAdapter", "RoadPlan", "forward", "plan_road"]
