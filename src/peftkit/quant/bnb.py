"""The optional bitsandbytes bridge: its kernels for NF4 on CUDA, and models it quantized, on any device.

bitsandbytes is imported lazily, once, on first use; without it (or without a usable backend)
:func:`import_bitsandbytes` returns None and peftkit runs its pure-PyTorch paths.
"""

from __future__ import annotations

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
