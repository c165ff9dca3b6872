"""Frozen int8 / NF4 weights that LoRA (and DoRA, IA3) wrap like any Linear: the QLoRA base.

Two formats, both for the weight ``W`` (out x in) of a frozen ``nn.Linear``:

* **int8**, per output channel (absmax): ``s_o = max_i |W[o, i]| / 127``,
  ``Q[o, i] = round(W[o, i] / s_o)`` in int8, ``Ŵ = Q · s``. Round-trip error ``|W - Ŵ| <= s_o / 2``.
* **NF4**, blockwise (Dettmers et al. 2023, "QLoRA"): each row is cut into blocks of ``block_size``
  consecutive weights; a block keeps its absmax ``c = max |w|`` and every weight the index of the
  nearest of the 16 NF4 levels ``q_j`` to ``w / c``; ``ŵ = q_j · c``. Two 4-bit indices are packed
  per byte (first weight in the high nibble), so the weight costs 4 bits plus 32 / block_size bits
  for the scale. Round-trip error ``|w - ŵ| <= c · max_j (q_{j+1} - q_j) / 2``.
  With ``double_quant`` the block scales are themselves quantized (the paper's double quantization):
  ``c' = c - mean(c)`` in groups of 256, int8 absmax per group (``|c - ĉ| <= max|c'|_group / 254``);
  the paper stores these second-level values as 8-bit floats, peftkit as linear int8.

The NF4 levels are the paper's: quantiles of N(0, 1), asymmetric so that 0 is exact (8 positive,
7 negative levels), normalized to [-1, 1] (see :func:`nf4_levels_from_definition`). The packing and
the level order are those of bitsandbytes, so on CUDA with bitsandbytes installed the 4-bit matmul
runs through ``bitsandbytes.matmul_4bit`` on the same buffers; everywhere else (CPU, or no
bitsandbytes) forward dequantizes the weight per matmul into the compute dtype in pure PyTorch,
and backward dequantizes again instead of keeping the float weight alive between the two.

Public API: :func:`quantize_model`, :func:`load_quantized`, :func:`dequantize_model`,
:func:`prepare_model_for_kbit_training`, :class:`Int8Linear`, :class:`NF4Linear`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, MergeError, PeftkitError, PeftkitWarning
from .core.inject import adapter_layers
from .core.layer import AdapterLayer
from .core.modules_to_save import ModulesToSaveWrapper
from .core.targets import get_submodule_parent, linear_module_names

# The 16 NF4 levels as bitsandbytes stores them (float32), index 7 is exactly 0.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
DOUBLE_QUANT_GROUP = 256  # block scales per second-level group (the paper's choice)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_METHOD = "peftkit"  # quantization_config.quant_method of folders written by save_quantized
# save_quantized's weights file: not model.safetensors, so that transformers' from_pretrained, which
# would copy the integer codes into float weights, finds no weights to load and refuses the folder
QUANTIZED_WEIGHTS_NAME = "model.peftkit-quantized.safetensors"


def nf4_levels_from_definition() -> torch.Tensor:
    """The NF4 levels computed from their definition (float64).

    With ``δ = (1/30 + 1/32) / 2`` (half-steps of a 15- and a 16-point grid), the positive levels are
    the N(0,1) quantiles ``Φ⁻¹(p)`` at 8 points ``p`` evenly spaced from ``1 - δ`` to 0.5 (last
    excluded), the negative ones ``-Φ⁻¹(p)`` at 7 points from ``1 - δ`` to 0.5 (last excluded), plus
    an exact 0; all divided by the largest, so they span [-1, 1].
    """
    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.max()


_NF4 = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_NF4_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2
# byte -> (level of the high nibble, level of the low nibble): one gather dequantizes two weights
_NF4_PAIRS = torch.stack([_NF4[torch.arange(256) >> 4], _NF4[torch.arange(256) & 15]], dim=1)
NF4_MAX_ERROR = float((_NF4[1:] - _NF4[:-1]).max() / 2)  # worst |w/c - q_j| (times the block absmax)


@functools.lru_cache(maxsize=None)
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(_NF4, _NF4_PAIRS, _NF4_MIDPOINTS)`` on ``device``, copied there once (a per-call ``.to(cuda)``
    of a CPU tensor would synchronize the stream at every matmul)."""
    return _NF4.to(device), _NF4_PAIRS.to(device), _NF4_MIDPOINTS.to(device)


# ---------------------------------------------------------------------------------------------
# the formats (pure functions on tensors)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax int8: returns ``Q`` (out, in) int8 and ``s`` (out,) float32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Ŵ = Q · s`` (per row), computed in float32 and returned in ``dtype``."""
    w = q.float().mul_(scale.float().unsqueeze(1))
    return w if dtype == torch.float32 else w.to(dtype)


def quantize_nf4(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4: returns the packed codes (out, in / 2) uint8 and the block absmax (out·in / block,) float32."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(-1, block_size)
    absmax = w.abs().amax(dim=1)
    normed = w / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(normed, _nf4_tables(w.device)[2], out_int32=True).to(torch.uint8)
    codes = codes.view(out_features, in_features)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return packed.contiguous(), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, block_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ŵ = q[code] · c`` per block, computed in float32 and returned in ``dtype``; shape (out, in)."""
    out_features = packed.shape[0]
    pairs = F.embedding(packed.to(torch.int32), _nf4_tables(packed.device)[1])  # (out, in/2, 2)
    w = pairs.view(-1, block_size).mul_(absmax.float().unsqueeze(1)).view(out_features, -1)
    return w if dtype == torch.float32 else w.to(dtype)


def quantize_scales(absmax: torch.Tensor, group: int = DOUBLE_QUANT_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of block scales: ``c - mean`` in int8 absmax per group of ``group``.

    Returns ``(codes int8 (n,), group scales float32 (ceil(n / group),), offset float32 (1,))``."""
    n = absmax.numel()
    offset = absmax.float().mean().reshape(1)
    centred = absmax.float() - offset
    pad = (-n) % group
    blocks = F.pad(centred, (0, pad)).view(-1, group)
    scale = blocks.abs().amax(dim=1) / 127
    codes = torch.round(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-127, 127)
    return codes.reshape(-1)[:n].to(torch.int8).contiguous(), scale, offset


def dequantize_scales(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      group: int = DOUBLE_QUANT_GROUP) -> torch.Tensor:
    n = codes.numel()
    pad = (-n) % group
    blocks = F.pad(codes.float(), (0, pad)).view(-1, group) * scale.float().unsqueeze(1)
    return blocks.reshape(-1)[:n] + offset.float()


# ---------------------------------------------------------------------------------------------
# bitsandbytes (optional: its kernels for NF4 on CUDA; models it quantized, on any device)

_BNB: Any = None


def _bitsandbytes() -> Any:
    """The bitsandbytes module if it is installed, else None (imported once, lazily)."""
    global _BNB
    if _BNB is None:
        try:
            import bitsandbytes  # noqa: F401

            _BNB = bitsandbytes
        except Exception:  # not installed, or installed without a usable backend
            _BNB = False
    return _BNB or None


def _is_bnb_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def is_quantized_module(module: nn.Module) -> bool:
    """A peftkit quantized linear, or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``."""
    return isinstance(module, QuantizedLinear) or _is_bnb_module(module)


def dequantize_weight(module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense (out, in) weight of a quantized linear (peftkit or bitsandbytes); a float weight as is."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize(dtype)
    if _is_bnb_module(module):
        bnb = _bitsandbytes()
        weight = module.weight
        if type(module).__name__ == "Linear4bit":
            w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        else:
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(module.state, "SCB", None)
            if weight.dtype != torch.int8 or scb is None:
                w = weight.data
            else:
                w = weight.data.float() * scb.float().unsqueeze(1) / 127
        return w.to(dtype) if dtype is not None else w
    weight = module.weight
    return weight.to(dtype) if dtype is not None else weight


# ---------------------------------------------------------------------------------------------
# the quantized linear layers


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
                  compute_dtype=compute_dtype or _compute_dtype_of(weight.dtype), device=weight.device,
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
        _check_block_size(block_size)
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
        _check_block_size(block_size)
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
        bnb = _bitsandbytes()
        if bnb is None:
            return None
        state = bnb.functional.QuantState(
            absmax=self.block_scales(), shape=torch.Size((self.out_features, self.in_features)),
            code=_nf4_tables(x.device)[0], blocksize=self.block_size, quant_type="nf4", dtype=self.compute_dtype)
        return bnb.matmul_4bit(x, self.weight.view(-1, 1).t(), bias=None, quant_state=state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.double_quant}"


def _check_block_size(block_size: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise PeftkitError(f"block_size must be an even integer >= 2 (e.g. 64), got {block_size!r}.")


def _compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


def _quant_args(bits: Any, block_size: Any, double_quant: Any, skip_modules: Any,
                compute_dtype: Optional[torch.dtype]) -> tuple[type["QuantizedLinear"], dict, Sequence[str]]:
    """Checked arguments shared by quantize_model and load_quantized: the layer class, its options
    and ``skip_modules`` as a list."""
    cls = _format_class(bits)
    options = _format_options(bits, block_size, double_quant)
    _check_compute_dtype(compute_dtype)
    return cls, options, [skip_modules] if isinstance(skip_modules, str) else skip_modules


def _format_class(bits: Any) -> type[QuantizedLinear]:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise PeftkitError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}.")
    return NF4Linear if bits == 4 else Int8Linear


def _format_options(bits: int, block_size: int, double_quant: bool) -> dict[str, Any]:
    if bits == 4:
        _check_block_size(block_size)
        return {"block_size": block_size, "double_quant": bool(double_quant)}
    if double_quant:
        raise PeftkitError("double_quant applies to 4-bit (NF4) block scales only; int8 has one scale per row.")
    return {}


def _check_compute_dtype(compute_dtype: Optional[torch.dtype]) -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise PeftkitError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype!r}.")


# ---------------------------------------------------------------------------------------------
# quantizing a model


def _skipped(key: str, skip_modules: Sequence[str]) -> bool:
    """``key`` is a skipped module or inside one (names match whole dotted components)."""
    padded = "." + key + "."
    return any(("." + s + ".") in padded for s in skip_modules)


def _quant_targets(model: nn.Module, skip_modules: Sequence[str]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(key, parent, attribute, linear) of every plain nn.Linear to quantize (the output head excluded)."""
    targets = []
    for key in sorted(linear_module_names(model)):
        if _skipped(key, skip_modules):
            continue
        module = model.get_submodule(key)
        if isinstance(module, ModulesToSaveWrapper):
            continue  # trained in full
        parent, attr = get_submodule_parent(model, key)
        while isinstance(module, AdapterLayer):  # quantize the base of an adapter layer
            parent, attr, module = module, "base_layer", module.base_layer
        if type(module) is not nn.Linear or isinstance(parent, nn.MultiheadAttention):
            continue  # transformers Conv1D, MHA's out_proj (read as a raw weight), custom subclasses
        targets.append((key, parent, attr, module))
    return targets


def quantize_model(model: nn.Module, bits: int = 4, block_size: int = 64, double_quant: bool = False,
                   skip_modules: Sequence[str] = (), compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Quantize every frozen ``nn.Linear`` of ``model`` in place (except the output head and ``skip_modules``).

    Args:
        bits: 8 (int8, per-output-channel absmax) or 4 (NF4, blockwise absmax).
        block_size: NF4 block length along a row (must divide every quantized layer's in_features).
        double_quant: also quantize the NF4 block scales (int8, groups of 256): 0.127 instead of 0.5
            extra bits per weight at block_size 64.
        skip_modules: module names (a name matches whole dotted components, e.g. ``"down_proj"`` or
            ``"layers.0"``) kept in full precision.
        compute_dtype: dtype of the matmuls (default: each weight's own dtype).

    Every check (bits, block size, dtypes, an already quantized model) runs before the first layer
    is touched. Layers are converted one at a time, so peak memory grows by one layer's worth.
    Returns ``model``.
    """
    cls, options, skip_modules = _quant_args(bits, block_size, double_quant, skip_modules, compute_dtype)
    already = [k for k, m in model.named_modules() if is_quantized_module(m)]
    if already:
        raise PeftkitError(f"The model is already quantized ({already[0]} is {type(model.get_submodule(already[0])).__name__}); "
                           "quantize a float model, or dequantize_model() it first.")
    targets = _quant_targets(model, skip_modules)
    if not targets:
        raise PeftkitError("quantize_model found no nn.Linear to quantize (the output head and skip_modules are never "
                           "quantized).")
    for key, _, _, linear in targets:
        cls.check_weight(linear.weight, key, **options)
    for key, parent, attr, linear in targets:
        setattr(parent, attr, cls.from_linear(linear, compute_dtype=compute_dtype, key=key, **options))
    _mark_quantized(model, bits, options, skip_modules)
    return model


def _mark_quantized(model: nn.Module, bits: int, options: dict, skip_modules: Sequence[str]) -> None:
    model.peftkit_quantization = {"bits": bits, **options, "skip_modules": list(skip_modules)}


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every quantized linear (peftkit, or bitsandbytes when installed) by an ``nn.Linear``
    holding its dequantized weight Ŵ, in place. Adapter layers keep wrapping the new float base.
    Returns ``model``."""
    for key, module in list(model.named_modules()):
        if not key or not is_quantized_module(module):
            continue
        if isinstance(module, QuantizedLinear):
            new = module.to_linear(dtype)
        else:  # bitsandbytes
            weight = dequantize_weight(module, dtype or torch.float32)
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
        parent, attr = get_submodule_parent(model, key)
        setattr(parent, attr, new)
    for _, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            module.clear_cache()
    if hasattr(model, "peftkit_quantization"):
        del model.peftkit_quantization
    return model


def requantize_weight_(module: nn.Module, weight: torch.Tensor) -> dict[str, float]:
    """Store ``weight`` into a quantized linear (requantizing); returns the error introduced."""
    if isinstance(module, QuantizedLinear):
        return module.requantize_(weight)
    raise MergeError(f"Merging into {type(module).__name__} weights (bitsandbytes) is not supported by peftkit; "
                     "use merge_and_unload(dequantize=True) for a float model.")


def requantization_report(model: nn.Module, warn: bool = True) -> Optional[dict[str, Any]]:
    """Summary of the errors introduced by merges into quantized weights since the last report.

    Returns None if no layer was requantized, else ``{"layers", "max_abs", "max_rel", "mean_rel",
    "per_layer": {key: stats}}``; with ``warn`` a PeftkitWarning states the figures."""
    per_layer = {}
    for key, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module._requantized_pending:
            per_layer[key] = dict(module.requantization_error or {})
            module._requantized_pending = False
    if not per_layer:
        return None
    rels = [s["rel"] for s in per_layer.values()]
    report = {
        "layers": len(per_layer),
        "max_abs": max(s["max_abs"] for s in per_layer.values()),
        "max_rel": max(rels),
        "mean_rel": sum(rels) / len(rels),
        "per_layer": per_layer,
    }
    if warn:
        warnings.warn(
            f"Merged into quantized weights: requantizing {report['layers']} layers introduced an error of max "
            f"|ΔW| = {report['max_abs']:.3g}, relative ‖ΔW‖/‖W‖ = {report['mean_rel']:.3g} on average "
            f"(worst {report['max_rel']:.3g}). Use merge_and_unload(dequantize=True) for an exact float model.",
            PeftkitWarning, stacklevel=3)
    return report


# ---------------------------------------------------------------------------------------------
# loading a Hugging Face folder layer by layer


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsReader:
    """Reads single tensors from a safetensors file with plain file reads (no mmap), so that only
    the tensors asked for ever occupy process memory. Never executes code."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb")
            size = os.fstat(self._fh.fileno()).st_size
            n = int.from_bytes(self._fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(self._fh.read(n))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has an unsupported or corrupt header entry.") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - start != nbytes or self._base + end > size:
                raise CheckpointError(f"{path}: tensor {key!r} is truncated or its offsets are corrupt.")
            self.entries[key] = (dtype, shape, start, end)

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[key]
        out = torch.empty(shape, dtype=dtype)
        if end > start:
            self._fh.seek(self._base + start)
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if self._fh.readinto(view) != end - start:
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated.")
        return out

    def close(self) -> None:
        self._fh.close()


def _checkpoint_files(model_dir: str) -> list[str]:
    saved = os.path.join(model_dir, QUANTIZED_WEIGHTS_NAME)
    if os.path.isfile(saved):
        return [saved]
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        return [os.path.join(model_dir, f) for f in dict.fromkeys(weight_map.values())]
    raise CheckpointError(f"{model_dir} has no model.safetensors (or sharded index); load_quantized reads "
                          "safetensors folders only.")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) and buffers on the CPU, so that
    computed non-persistent buffers (rotary frequencies) keep their values. Not thread-safe."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load_quantized(model_dir: Union[str, os.PathLike], bits: int = 4, model_class: Any = None, *,
                   block_size: int = 64, double_quant: bool = False, skip_modules: Sequence[str] = (),
                   compute_dtype: Optional[torch.dtype] = None, dtype: Optional[torch.dtype] = None,
                   **config_kwargs: Any) -> nn.Module:
    """Load a Hugging Face model folder, quantizing its linear layers one at a time as they are read.

    The model is built with its parameters on the meta device, then each tensor is read from the
    safetensors file(s) on its own; a linear layer's weight is quantized right after it is read, so
    the full-precision weights never all exist in memory at once (peak: the quantized model plus one
    float layer). The result equals ``quantize_model(model_class.from_pretrained(model_dir), ...)``.
    A folder written by :func:`save_quantized` loads as it was saved (its own format; the
    quantization arguments are then not used).

    Args:
        model_dir: a local folder with config.json and model.safetensors (or a sharded index).
        bits, block_size, double_quant, skip_modules, compute_dtype: as :func:`quantize_model`.
        model_class: a transformers Auto class or model class (default ``AutoModelForCausalLM``).
        dtype: cast the non-quantized float tensors (and the default compute dtype) to this dtype.
        config_kwargs: overrides passed to ``AutoConfig.from_pretrained``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cls, options, skip_modules = _quant_args(bits, block_size, double_quant, skip_modules, compute_dtype)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise PeftkitError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}.")
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir} is not a Hugging Face model folder (no config.json).")
    files = _checkpoint_files(model_dir)
    readers = [_SafetensorsReader(f) for f in files]
    try:
        where = {k: r for r in readers for k in r.entries}
        config = AutoConfig.from_pretrained(model_dir, **config_kwargs)
        saved = getattr(config, "quantization_config", None)
        if isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
            delattr(config, "quantization_config")
        elif saved is not None:
            raise CheckpointError(f"{model_dir} holds a model quantized by another library ({saved!r}); "
                                  "load_quantized reads float folders and folders written by save_quantized.")
        else:
            saved = None
        model_class = model_class or AutoModelForCausalLM
        with _parameters_on_meta():
            model = model_class.from_config(config)
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in model.named_buffers()}
        prefix = getattr(model, "base_model_prefix", "") or ""

        def file_key(name: str, required: bool = False) -> Optional[str]:
            for cand in (name, f"{prefix}.{name}" if prefix else None,
                         name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
                if cand is not None and cand in where:
                    return cand
            if required:
                raise CheckpointError(f"{model_dir}: the checkpoint has no tensor for {name}.")
            return None

        def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            key = file_key(name, required=True)
            if where[key].entries[key][1] != tuple(shape):
                raise CheckpointError(f"{model_dir}: {key} has shape {where[key].entries[key][1]}, the model "
                                      f"expects {tuple(shape)}.")
            return where[key].read(key)

        if saved is not None:
            loaded = _load_saved_quantized(model, saved, read, model_dir)
        else:
            loaded = _load_and_quantize(model, cls, options, skip_modules, compute_dtype, dtype, read, model_dir)

        for name in sorted(names - loaded):
            fkey = file_key(name)
            if fkey is None:
                continue
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if attr in module._parameters:
                tensor = read(name, tuple(module._parameters[attr].shape))
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            elif attr in module._buffers and module._buffers[attr] is not None:
                module._buffers[attr] = read(name, tuple(module._buffers[attr].shape))
    finally:
        for r in readers:
            r.close()
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{model_dir}: the checkpoint has no tensors for {len(missing)} parameters "
                              f"(e.g. {missing[:3]}); it does not match {type(model).__name__}.")
    model.eval()
    try:
        from transformers import GenerationConfig

        if getattr(model, "generation_config", None) is not None and \
                os.path.isfile(os.path.join(model_dir, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except Exception:  # generation settings are optional
        pass
    model.config._name_or_path = model_dir
    if hasattr(model, "name_or_path"):
        model.name_or_path = model_dir
    if saved is not None:
        model.peftkit_quantization = {k: v for k, v in saved.items() if k not in ("quant_method", "modules")}
    else:
        _mark_quantized(model, bits, options, skip_modules)
    return model


def _load_and_quantize(model: nn.Module, cls: type[QuantizedLinear], options: dict, skip_modules: Sequence[str],
                       compute_dtype: Optional[torch.dtype], dtype: Optional[torch.dtype], read: Any,
                       model_dir: str) -> set[str]:
    """Read and quantize every target linear, one float layer in memory at a time; returns the keys read."""
    targets = _quant_targets(model, skip_modules)
    for key, _, _, linear in targets:  # every check before the first read
        cls.check_weight(linear.weight, key, allow_meta=True, **options)
    loaded = set()
    for key, parent, attr, linear in targets:
        float_layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        weight = read(f"{key}.weight", tuple(linear.weight.shape))
        float_layer.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            bias = read(f"{key}.bias", tuple(linear.bias.shape))
            float_layer.bias = nn.Parameter(bias.to(dtype) if dtype is not None else bias, requires_grad=False)
        layer_dtype = compute_dtype or dtype or _compute_dtype_of(weight.dtype)
        setattr(parent, attr, cls.from_linear(float_layer, compute_dtype=layer_dtype, key=key, **options))
        del float_layer, weight
        loaded |= {f"{key}.weight", f"{key}.bias"}
    return loaded


def _load_saved_quantized(model: nn.Module, saved: dict, read: Any, model_dir: str) -> set[str]:
    """Rebuild the quantized linears listed in a save_quantized config and read their tensors."""
    loaded = set()
    modules = saved.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{model_dir}: quantization_config has no 'modules'; the folder is corrupt.")
    for key, info in modules.items():
        try:
            linear = model.get_submodule(key)
            cls = _format_class(info["bits"])
            opts = _format_options(info["bits"], info.get("block_size", 64), info.get("double_quant", False))
            compute = getattr(torch, info["compute_dtype"])
        except (AttributeError, KeyError, TypeError, PeftkitError) as exc:
            raise CheckpointError(f"{model_dir}: bad quantization_config entry for {key!r} ({exc}).") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{model_dir}: {key} is not a linear layer of {type(model).__name__}.")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute, **opts)
        with torch.no_grad():
            for name, tensor in new.state_dict().items():
                value = read(f"{key}.{name}", tuple(tensor.shape))
                if value.dtype != tensor.dtype and not (name == "bias" and value.is_floating_point()):
                    raise CheckpointError(f"{model_dir}: {key}.{name} has dtype {value.dtype}, expected {tensor.dtype}.")
                if name == "bias":
                    new.bias = nn.Parameter(value, requires_grad=False)
                else:
                    getattr(new, name).copy_(value)
                loaded.add(f"{key}.{name}")
        parent, attr = get_submodule_parent(model, key)
        setattr(parent, attr, new)
    return loaded


def save_quantized(model: nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Write a quantized model (e.g. merged into its quantized weights) as a folder that
    :func:`load_quantized` reads back exactly: config.json with a ``quantization_config``
    (``quant_method: "peftkit"`` and each quantized module's format) and model.safetensors holding
    the codes and scales (in ``model.peftkit-quantized.safetensors``: transformers' own
    ``from_pretrained`` finds no weights file there and refuses the folder rather than loading the
    codes as float weights). Files are written atomically."""
    from .checkpoint import atomic_write_bytes, save_tensors

    if any(True for _ in adapter_layers(model)):
        raise PeftkitError("save_quantized needs a model without adapter layers: merge_and_unload() or unload() first.")
    modules = {k: m for k, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not modules:
        raise PeftkitError("save_quantized: the model has no peftkit quantized layer; use save_pretrained for float "
                           "models.")
    if any(_is_bnb_module(m) for m in model.modules()):
        raise PeftkitError("save_quantized cannot write bitsandbytes layers; use transformers' save_pretrained.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise PeftkitError("save_quantized needs a transformers model (with a .config).")
    os.makedirs(save_directory, exist_ok=True)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ptr in seen:  # tied weights are stored once (tie_weights restores them on load)
            continue
        seen.add(ptr)
        tensors[name] = tensor.detach()
    entries = {}
    for key, m in modules.items():
        entry = {"bits": m.bits, "compute_dtype": str(m.compute_dtype).replace("torch.", "")}
        if isinstance(m, NF4Linear):
            entry.update(block_size=m.block_size, double_quant=m.double_quant)
        entries[key] = entry
    info = dict(getattr(model, "peftkit_quantization", {}) or {})
    info.update(quant_method=QUANT_METHOD, modules=entries)
    save_tensors(tensors, os.path.join(save_directory, QUANTIZED_WEIGHTS_NAME))
    data = config.to_dict()
    data["quantization_config"] = info
    atomic_write_bytes(os.path.join(save_directory, "config.json"), (json.dumps(data, indent=2) + "\n").encode())
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(save_directory)


# ---------------------------------------------------------------------------------------------
# training preparation


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Prepare a quantized model for adapter training, as Hugging Face PEFT does.

    1. freeze every parameter; 2. cast float16 / bfloat16 parameters that are not quantized to
    float32 (norms, embeddings, head); 3. if the model has quantized layers and
    ``use_gradient_checkpointing``: make the input embeddings' output require grad (needed by
    re-entrant checkpointing) and enable transformers' gradient checkpointing. Returns ``model``.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    quantized = any(is_quantized_module(m) for m in model.modules())
    if not (quantized and use_gradient_checkpointing):
        return model
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        warnings.warn(f"{type(model).__name__} has no gradient checkpointing support; continuing without it.",
                      PeftkitWarning, stacklevel=2)
        return model
    reentrant = kwargs.get("use_reentrant", True)
    kwargs["use_reentrant"] = reentrant
    if reentrant:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            def make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                output.requires_grad_(True)

            model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
    params = inspect.signature(enable).parameters
    if "activation_checkpointing_kwargs" in params:
        enable(activation_checkpointing_kwargs=kwargs)
    elif "gradient_checkpointing_kwargs" in params:
        enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable()
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights and scales of ``model`` (biases and float layers excluded)."""
    return sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
