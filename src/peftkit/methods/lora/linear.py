"""LoRA on linear maps: ``nn.Linear``, transformers ``Conv1D`` (``fan_in_fan_out``) and quantized linears."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...core.kernels import batched_lora, dropout_p, rowwise_dropout
from ...core.mixed import MixedBatch
from ...core.undo import record_base_edit
from ...errors import ConfigError, PeftkitError
from ...quant import dequantize_weight
from . import fast_path
from .config import LoraConfig
from .dora import DoraLinear
from .layer import LoraLayer, store_base_weight


class Linear(LoraLayer):
    """LoRA on a linear map: ``y = W x + b + s · B A dropout(x)`` (DoRA: :class:`~.dora.DoraLinear`).

    Shapes: x (..., in) -> y (..., out); A (r, in); B (out, r). With ``fan_in_fan_out`` the base
    weight is stored (in, out) (transformers ``Conv1D``); A and B keep the shapes above. Without
    autograd, in the plain case, the forward takes the no-grad road of :mod:`.fast_path`.
    """

    dora_variant = DoraLinear
    forward = fast_path.forward  # the road, falling back to LoraLayer.forward
    fused_road = True  # in training, the forward may take the fused road (.fused.set_fused_training)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        base = self.get_base_layer()
        if hasattr(base, "in_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:  # transformers Conv1D: weight (in, out)
            self.in_features, self.out_features = base.weight.shape

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        device = self._adapter_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device)

    def _init_pissa(self, name: str, init: str) -> None:
        base = self.get_base_layer()  # a quantized base gets the residual requantized (QPiSSA)
        weight = dequantize_weight(base)
        w = weight.float().T if self.fan_in_fan_out else weight.float()
        r, s = self.r[name], self.scaling[name]
        if r > min(w.shape):
            raise ConfigError(f"PiSSA takes the top r singular vectors of the {tuple(w.shape)} weight, so r={r} must be "
                              f"at most {min(w.shape)}; use a smaller r (or rank_pattern for this module).")
        if init == "pissa":
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        else:
            niter = int(init.rsplit("_", 1)[1])
            V, S, U = torch.svd_lowrank(w, q=r, niter=niter)
            Uh = U.T
        Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
        A = torch.diag(Sr.sqrt()) @ Uhr
        B = Vr @ torch.diag(Sr.sqrt())
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
            residual = w - s * (B @ A)
            record_base_edit(base)  # put back if creating the adapter fails later
            store_base_weight(base, residual.T if self.fan_in_fan_out else residual)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        delta = delta.T if self.fan_in_fan_out else delta
        mask = self._buffers.get("delta_mask")
        return delta if mask is None else delta * mask

    # -- sparsity-preserving LoRA (a pruned base keeps its zeros) ----------------------------------
    def set_delta_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Multiply every adapter's ``ΔW = s B A`` by ``mask`` (bool, True = kept; the base weight's shape
        and layout): ``y = W x + b + ((s B A) ⊙ M) x``. Trained this way, merging is exact and keeps every
        zero of a pruned ``W``. The forward then forms the (out x in) ``ΔW`` at every call instead of two
        thin products (its cost: docs/compression.md). Not with DoRA or mixed-adapter batches. ``None``
        removes the mask. The mask is not saved in the adapter file: it belongs to the pruned base."""
        if mask is None:
            self._buffers.pop("delta_mask", None)
            self.clear_cache()
            return
        weight = self.get_base_layer().weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(f"A sparsity mask of shape {tuple(mask.shape)} does not fit the base weight "
                              f"{tuple(weight.shape)}.")
        if any(self.use_dora.values()):
            raise ConfigError("Sparsity-preserving LoRA does not support DoRA adapters (DoRA rescales whole rows).")
        self.register_buffer("delta_mask", mask.to(device=weight.device, dtype=torch.bool), persistent=False)
        self.clear_cache()

    def _masked_add(self, name: str, xa: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + ((s B A) ⊙ M) x`` (+ B's bias · s): ``ΔW`` formed in the adapter's dtype."""
        if name in self.dora:
            raise PeftkitError("Sparsity-preserving LoRA does not support DoRA adapters.")
        A, B = self.lora_A[name].weight, self.lora_B[name]
        mask = self._buffers["delta_mask"]
        delta = (B.weight @ A) * self.scaling[name]
        # where(), not a product with a float copy of the mask: backward then keeps the 1-byte mask only
        delta = torch.where(mask.T if self.fan_in_fan_out else mask, delta, delta.new_zeros(()))
        bias = B.bias * self.scaling[name] if B.bias is not None else None
        return result + F.linear(xa, delta, bias).to(result.dtype)

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # plain dict lookups (not nn.Module attribute access): this runs once per layer per forward
        d = self.__dict__
        modules = d["_modules"]
        A = modules["lora_A"]._modules[name]._parameters["weight"]
        B = modules["lora_B"]._modules[name]._parameters
        dropout = modules["lora_dropout"]._modules[name]
        if x.dtype is not A.dtype:
            if not self.cast_input_dtype_enabled:
                return self._add_uncast(name, x, result)
            x = x.to(A.dtype)
        xa = x
        if type(dropout) is not nn.Identity:
            xa = dropout(xa)
        if "delta_mask" in d["_buffers"]:
            return self._masked_add(name, xa, result)
        if name in d["dora"]:
            return d["dora"][name].forward(self, name, xa, result)
        weight, bias, s = B["weight"], B["bias"], d["scaling"][name]
        if isinstance(s, torch.Tensor):  # prepare_model_for_compiled_hotswap: a tensor, so compiled graphs keep it as an input
            return result + F.linear(F.linear(xa, A), weight, bias).to(result.dtype) * s
        if bias is None and result.dtype is xa.dtype and result.is_contiguous():
            # ``result + s · (x Aᵀ) Bᵀ`` on 2-D views, the second product a GEMM with beta=1: no (…, out)
            # temporary and no separate add pass. (Inference in the plain case takes the no-grad
            # road of :meth:`forward`, which adds in place.)
            h = F.linear(xa.reshape(-1, d["in_features"]), A)
            return torch.addmm(result.view(-1, d["out_features"]), h, weight.t(), alpha=s).view(result.shape)
        h = F.linear(xa, A)
        return torch.add(result, F.linear(h, weight, bias).to(result.dtype), alpha=s)

    def _add_uncast(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``_add_adapter`` with input dtype casting disabled (:func:`peftkit.helpers.disable_input_dtype_casting`):
        ``x`` reaches the adapter's modules as it is, called as modules so that their hooks run."""
        xd = self.lora_dropout[name](x)
        if "delta_mask" in self._buffers:
            return self._masked_add(name, xd, result)
        if name in self.dora:
            return self.dora[name].forward(self, name, xd, result)
        return result + (self.lora_B[name](self.lora_A[name](xd)) * self.scaling[name]).to(result.dtype)

    # -- mixed batches ------------------------------------------------------------------------
    def _stacked(self, names: tuple[str, ...], device: torch.device, static: bool = False):
        """All adapters' A (n+1, in, r_pad) and s·B (n+1, r_pad, out), slot 0 zeros ("no adapter"),
        ranks zero-padded to the largest (rounded up to a multiple of 8 for grouped matmuls); plus
        the DoRA factors f (n+1, out) (ones for non-DoRA slots) or None, and the scaled lora_B
        biases (n+1, out) or None. Cached while no gradient is needed and no weight changed
        (tracked by tensor versions; ``static``: the caller promises no weight changed in place, so only
        the adapter names are compared: installing or deleting an adapter clears the cache)."""
        hit = self._stack_cache
        if static and hit is not None and hit[0][0] == names and hit[0][-1] == device:
            return hit[1]
        # plain dict lookups (not nn.Module attribute access): this runs on every mixed-batch forward
        mods_a, mods_b = self.lora_A._modules, self.lora_B._modules
        params = [mods_a[n]._parameters["weight"] for n in names] + [mods_b[n]._parameters["weight"] for n in names]
        dora = [n for n in names if self.use_dora[n]]
        params += [self.lora_magnitude_vector[n].weight for n in dora]
        params += [mods_b[n]._parameters["bias"] for n in names if self.lora_bias[n]]
        if dora:
            params.append(self.get_base_layer().weight)
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (names, tuple(p._version for p in params), tuple(scale_key(self.scaling[n]) for n in names), device)
        if not need_grad and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        r_pad = -(-max(self.r[n] for n in names) // 8) * 8
        dtype = self.lora_A[names[0]].weight.dtype
        zero_a = torch.zeros(self.in_features, r_pad, device=device, dtype=dtype)
        zero_b = torch.zeros(r_pad, self.out_features, device=device, dtype=dtype)
        a_list, b_list = [zero_a], [zero_b]
        for n in names:
            pad = r_pad - self.r[n]
            a_list.append(F.pad(self.lora_A[n].weight.T, (0, pad)))
            b_list.append(F.pad(self.lora_B[n].weight.T * self.scaling[n], (0, 0, 0, pad)))
        A, B = torch.stack(a_list), torch.stack(b_list)
        factors = None
        if dora:
            weight = dequantize_weight(self.get_base_layer()).to(dtype)
            ones = torch.ones(self.out_features, device=device, dtype=dtype)
            rows = [ones]
            for n in names:
                if self.use_dora[n]:
                    rows.append(self.dora[n].row_factor(self, n, weight))
                else:
                    rows.append(ones)
            factors = torch.stack(rows)
        bias = None
        if any(self.lora_bias[n] for n in names):
            zeros = torch.zeros(self.out_features, device=device, dtype=dtype)
            bias = torch.stack([zeros] + [self.lora_B[n].bias * self.scaling[n] if self.lora_bias[n] else zeros
                                          for n in names])
        value = (A, B, factors, bias)
        if not need_grad:
            self._stack_cache = (key, value)
        return value

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        names = tuple(self.lora_A.keys())
        if not names:
            return result
        if "delta_mask" in self._buffers:
            raise PeftkitError("A sparsity-masked LoRA layer (set_delta_mask) does not run mixed-adapter batches; "
                               "merge the adapter with keep_sparsity=True, or run one adapter per batch.")
        rows = x.shape[0]
        plan = mixed.plan(names, x.device, rows)
        idx = plan.idx
        A, B, factors, bias = self._stacked(names, x.device, mixed.static)
        shape = x.shape
        x3 = x.reshape(rows, -1, shape[-1]).to(A.dtype)
        if self.training:
            x3 = rowwise_dropout(x3, [0.0] + [dropout_p(self.lora_dropout[n]) for n in names], idx)
            if factors is not None and any(self.use_dora[n] and dropout_p(self.lora_dropout[n]) > 0 for n in names):
                raise PeftkitError("Mixed-adapter batches with DoRA and lora_dropout > 0 cannot be trained; "
                                   "set lora_dropout=0 or train one adapter per batch.")
        if factors is None and bias is None and result.dtype == A.dtype and result.is_contiguous():
            # the usual case: add into the base output inside the second batched matmul
            out = batched_lora(x3, A, B, plan, add_to=result.view(rows, -1, self.out_features), in_place=fresh)
            return out.view(result.shape)
        lora = batched_lora(x3, A, B, plan)
        if bias is not None:
            lora = lora + bias.index_select(0, idx).unsqueeze(1)
        lora = lora.view(*shape[:-1], self.out_features)
        if factors is None:
            return result + lora.to(result.dtype)
        f = factors.index_select(0, idx).view(shape[0], *([1] * (len(shape) - 2)), self.out_features)
        base = self.get_base_layer()
        base_out = result.to(lora.dtype)
        if getattr(base, "bias", None) is not None:
            base_out = base_out - base.bias.to(lora.dtype)
        return result + ((f - 1) * base_out + f * lora).to(result.dtype)


def scale_key(s: Union[float, torch.Tensor]) -> Union[float, tuple[int, int]]:
    """What identifies a scaling's value in a cache key: the number, or a tensor's identity and
    version (a tensor scaling is changed in place by hot-swapping)."""
    return (id(s), s._version) if isinstance(s, torch.Tensor) else s


__all__ = ["Linear", "scale_key"]
