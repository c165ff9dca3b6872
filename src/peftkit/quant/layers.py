"""The quantized linear layers: :class:`Int8Linear` and :class:`NF4Linear` (frozen, in the formats of
:mod:`peftkit.quant.formats`), and the helpers that treat them and bitsandbytes' layers alike.

Forward dequantizes the weight per matmul into the compute dtype in pure PyTorch, and backward
dequantizes again instead of keeping the float weight alive between the two; on CUDA with
bitsandbytes installed :class:`NF4Linear` runs through ``bitsandbytes.matmul_4bit`` on the same buffers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError, PeftkitError
from .bnb import dequantize_bnb_weight, import_bitsandbytes, is_bnb_module
from .formats import (
    DOUBLE_QUANT_GROUP,
    dequantize_int8,
    dequantize_nf4,
    dequantize_scales,
    nf4_tables,
    quantize_int8,
    quantize_nf4,
    quantize_scales,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_block_size(block_size: Any) -> None:
    """Raise PeftkitError unless ``block_size`` is an even integer >= 2."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise PeftkitError(f"block_size must be an even integer >= 2 (e.g. 64), got {block_size!r}.")


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The default compute dtype for a weight of ``dtype``: itself if it is a compute dtype, else float32."""
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


class _DequantMatmul(torch.autograd.Function):
    """``y = x Ŵᵀ`` where Ŵ is dequantized on the fly; backward dequantizes again (``∂x = ∂y Ŵ``),
    so no float copy of the weight outlives the matmul. The weight gets no gradient (frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: "QuantizedLinear") -> torch.Tensor:
        ctx.module = module
        ctx.version = module.weight._version
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        module = ctx.module
        if module.weight._version != ctx.version:
            raise RuntimeError("A quantized weight was changed (merged/requantized) between forward and backward.")
        return grad @ module.dequantize(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized: ``y = x Ŵᵀ + b``.

    Shapes: x (..., in) -> y (..., out). ``weight`` holds the codes (a non-trainable integer
    ``nn.Parameter``), :meth:`dequantize` returns Ŵ (out, in). The input is cast to
    ``compute_dtype`` for the matmul and the output back to the input's dtype. ``bias`` (if any) is
    an ordinary float parameter (frozen by default; LoRA's ``bias="all"`` may train it).
    """

    is_quantized_linear = True
    bits: int = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 bias_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype or compute_dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # stats of the last requantization (merge into the quantized weights); see requantization_report
        self.requantization_error: Optional[dict[str, float]] = None
        self._requantized_pending = False

    # -- format hooks -------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Ŵ (out, in) in ``dtype`` (default: the compute dtype)."""
        raise NotImplementedError

    def _quantize_into(self, weight: torch.Tensor) -> None:
        """Quantize a dense (out, in) weight into this module's buffers, in place."""
        raise NotImplementedError

    @classmethod
    def check_weight(cls, weight: torch.Tensor, key: str, *, allow_meta: bool = False, **options: Any) -> None:
        """Raise PeftkitError if ``weight`` cannot be stored in this format (before anything changes)."""
        if weight.device.type == "meta" and not allow_meta:
            raise PeftkitError(f"{key}: the weight is on the meta device (not loaded); quantize a loaded model or use "
                               "peftkit.load_quantized(model_dir, ...).")
        if weight.dtype not in FLOAT_DTYPES:
            raise PeftkitError(f"{key}: cannot quantize a weight of dtype {weight.dtype}; supported: float16, bfloat16, "
                               "float32, float64.")
        if weight.dim() != 2:
            raise PeftkitError(f"{key}: expected a 2-d weight, got shape {tuple(weight.shape)}.")

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: Optional[torch.dtype] = None, key: str = "linear",
                    **options: Any) -> "QuantizedLinear":
        """Quantize ``linear`` (an ``nn.Linear``); the float weight is not kept."""
        weight = linear.weight
        cls.check_weight(weight, key, **options)
        if not torch.isfinite(weight).all():
            raise PeftkitError(f"{key}: the weight has NaN/inf values and cannot be quantized.")
        bias = getattr(linear, "bias", None)
        new = cls(linear.in_features, linear.out_features, bias=bias is not None,
                  compute_dtype=compute_dtype or compute_dtype_of(weight.dtype), device=weight.device,
                  bias_dtype=bias.dtype if bias is not None else None, **options)
        new._quantize_into(weight)
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias.detach())
        return new

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        xc = x.to(self.compute_dtype)
        y = self._bnb_forward(xc) if xc.is_cuda else None
        if y is None:
            y = _DequantMatmul.apply(xc, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(out_dtype)

    def _bnb_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bitsandbytes kernel for this format, or None to use the PyTorch path."""
        return None

    def requantize_(self, weight: torch.Tensor) -> dict[str, float]:
        """Store a new dense weight (quantizing it) in place; return and record the error introduced.

        Error stats, against ``weight``: ``max_abs`` = max |Ŵ - W|, ``rms``, ``rel`` = ‖Ŵ - W‖_F / ‖W‖_F.
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise MergeError(f"requantize_: expected a weight of shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}.")
        if not torch.isfinite(weight).all():
            raise MergeError("requantize_: the new weight has NaN/inf values; nothing was changed.")
        target = weight.detach().float()
        with torch.no_grad():
            self._quantize_into(target)
            err = self.dequantize(torch.float32) - target
        stats = {
            "max_abs": float(err.abs().max()),
            "rms": float(err.pow(2).mean().sqrt()),
            "rel": float(err.norm() / target.norm().clamp_min(torch.finfo(torch.float32).tiny)),
        }
        self.requantization_error = stats
        self._requantized_pending = True
        return stats

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding Ŵ in ``dtype`` (default: the compute dtype); exact, no rounding
        beyond the cast to ``dtype``."""
        dtype = dtype or self.compute_dtype
        weight = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    def storage_bytes(self) -> int:
        """Bytes held by the quantized weight and its scales (the bias excluded)."""
        return sum(t.numel() * t.element_size() for n, t in self.named_parameters(recurse=False) if n != "bias") + \
            sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantizedLinear":
        # model.half() / .to(bfloat16) must not round the float32 scales: they follow device moves only
        scales = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        for n in scales:
            del self._buffers[n]
        try:
            super()._apply(fn, recurse)
        finally:
            for n, old in scales.items():
                moved = fn(old)
                self._buffers[n] = moved if moved.dtype == old.dtype else old.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={str(self.compute_dtype).replace('torch.', '')}")


class Int8Linear(QuantizedLinear):
    """int8 weight, one absmax scale per output channel: ``Ŵ[o] = Q[o] · s_o``, ``s_o = max|W[o]| / 127``.

    Buffers: ``weight`` (out, in) int8, ``weight_scale`` (out,) float32. Pure PyTorch on every device:
    bitsandbytes' int8 matmul (LLM.int8) also rounds the activations to int8, so it would give other
    results than this layer's definition; models quantized by bitsandbytes itself keep its kernel.
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 bias_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device, bias_dtype)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def _quantize_into(self, weight: torch.Tensor) -> None:
        q, scale = quantize_int8(weight)
        with torch.no_grad():
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)


class NF4Linear(QuantizedLinear):
    """4-bit NormalFloat weight, blockwise absmax: ``ŵ = q[code] · c_block`` (see the module doc).

    Buffers: ``weight`` (out, in / 2) uint8 (two codes per byte, first in the high nibble) and the
    block scales: ``absmax`` (out · in / block_size,) float32, or with ``double_quant``
    ``absmax_codes`` int8, ``absmax_scale`` (groups of 256,) float32, ``absmax_offset`` (1,) float32.
    On CUDA with bitsandbytes installed the matmul runs through ``bitsandbytes.matmul_4bit``.
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 bias_dtype: Optional[torch.dtype] = None, block_size: int = 64, double_quant: bool = False) -> None:
        check_block_size(block_size)
        if in_features % block_size:
            raise PeftkitError(f"block_size={block_size} does not divide the row length in_features={in_features}.")
        super().__init__(in_features, out_features, bias, compute_dtype, device, bias_dtype)
        self.block_size = block_size
        self.double_quant = double_quant
        n_blocks = out_features * in_features // block_size
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        if double_quant:
            groups = -(-n_blocks // DOUBLE_QUANT_GROUP)
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(groups, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros(1, dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))

    @classmethod
    def check_weight(cls, weight: torch.Tensor, key: str, *, allow_meta: bool = False, block_size: int = 64,
                     **options: Any) -> None:
        super().check_weight(weight, key, allow_meta=allow_meta)
        check_block_size(block_size)
        if weight.shape[1] % block_size:
            raise PeftkitError(
                f"{key}: block_size={block_size} does not divide the row length in_features={weight.shape[1]}; "
                f"choose a block size that divides it or skip this module (skip_modules=[{key.rsplit('.', 1)[-1]!r}])."
            )

    def block_scales(self) -> torch.Tensor:
        """The per-block absmax c (out · in / block_size,) float32 (dequantized if double-quantized)."""
        if self.double_quant:
            return dequantize_scales(self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nf4(self.weight, self.block_scales(), self.block_size, dtype or self.compute_dtype)

    def _quantize_into(self, weight: torch.Tensor) -> None:
        packed, absmax = quantize_nf4(weight, self.block_size)
        with torch.no_grad():
            self.weight.copy_(packed)
            if self.double_quant:
                codes, scale, offset = quantize_scales(absmax)
                self.absmax_codes.copy_(codes)
                self.absmax_scale.copy_(scale)
                self.absmax_offset.copy_(offset)
            else:
                self.absmax.copy_(absmax)

    def _bnb_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # Same buffers as bitsandbytes' NF4 (block-major codes, high nibble first, the same 16 levels), so
        # its kernel reads them directly (tests/test_bnb.py checks this call on CPU against the PyTorch path).
        bnb = import_bitsandbytes()
        if bnb is None:
            return None
        state = bnb.functional.QuantState(
            absmax=self.block_scales(), shape=torch.Size((self.out_features, self.in_features)),
            code=nf4_tables(x.device)[0], blocksize=self.block_size, quant_type="nf4", dtype=self.compute_dtype)
        return bnb.matmul_4bit(x, self.weight.view(-1, 1).t(), bias=None, quant_state=state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.double_quant}"


def is_quantized_module(module: nn.Module) -> bool:
    """A peftkit quantized linear, or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``."""
    return isinstance(module, QuantizedLinear) or is_bnb_module(module)


def dequantize_weight(module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense (out, in) weight of a quantized linear (peftkit or bitsandbytes); a float weight as is."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize(dtype)
    if is_bnb_module(module):
        return dequantize_bnb_weight(module, dtype)
    weight = module.weight
    return weight.to(dtype) if dtype is not None else weight
