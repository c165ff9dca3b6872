"""The optional bitsandbytes bridge: its kernels for NF4 on CUDA, and models it quantized, on any device.

bitsandbytes is imported lazily, once, on first use; without it (or without a usable backend)
:func:`import_bitsandbytes` returns None and peftkit runs its pure-PyTorch paths.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

_BNB: Any = None


def import_bitsandbytes() -> Any:
    """The bitsandbytes module if it is installed, else None (imported once, lazily)."""
    global _BNB
    if _BNB is None:
        try:
            import bitsandbytes  # noqa: F401

            _BNB = bitsandbytes
        except Exception:  # not installed, or installed without a usable backend
            _BNB = False
    return _BNB or None


def is_bnb_module(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (recognised by type, without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def dequantize_bnb_weight(module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense (out, in) weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, in ``dtype``
    (default: as bitsandbytes returns it)."""
    bnb = import_bitsandbytes()
    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_for_cpu(data, state)
        w = bnb.functional.dequantize_4bit(data, state)
    else:
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(module.state, "SCB", None)
        if weight.dtype != torch.int8 or scb is None:
            w = weight.data
        else:
            w = weight.data.float() * scb.float().unsqueeze(1) / 127
    return w.to(dtype) if dtype is not None else w


def _unpacked_for_cpu(data: torch.Tensor, state: Any, block_n: int = 32) -> tuple[torch.Tensor, Any]:
    """The 4-bit codes and quantization state of a ``Linear4bit`` whose weight bitsandbytes repacked for
    its AVX512-BF16 CPU kernel (on the first no-grad forward on such a CPU), back in the layout
    ``dequantize_4bit`` reads, without touching the module. The repacked weight (out, in / 2) holds,
    for each block of 32 output rows and each pair of input columns, the 64 codes (row-major, 32 x 2)
    in 32 bytes: codes 0..31 in the low nibbles, codes 32..63 in the high ones. The block scales are
    the bf16 ones the kernel uses (the repacking rounded them), transposed back to row-major block
    order. (The inverse of
    bitsandbytes' ``_convert_weight_packed_for_cpu``, written here: its own inverse is private and
    leaves the scales transposed.)"""
    out_features, half = data.shape
    groups = data.reshape(-1, 32)  # 32 bytes: low nibbles = codes 0..31, high nibbles = codes 32..63
    codes = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # codes of (32 rows x 2 columns), row-major
    codes = codes.reshape(out_features // block_n, half, block_n, 2).transpose(1, 2).reshape(out_features, 2 * half)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # first weight in the high nibble, as dequantize_4bit reads
    state = copy.copy(state)
    state.absmax = state.absmax.T.reshape(-1).float()
    state.nested, state.dtype = False, getattr(state, "original_dtype", state.dtype)
    state.packing_format_for_cpu = False
    packed = packed.reshape(state.original_qshape) if hasattr(state, "original_qshape") else packed.reshape(-1, 1)
    storage = getattr(state, "original_storage_type", None)
    return (packed.view(storage) if storage is not None else packed), state
