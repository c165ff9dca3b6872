"""Calling a wrapped base layer: the plain-``nn.Linear`` shortcut every wrapper layer may take.

A leaf of the engine. :func:`call_base` runs ``base(x)``; for an exact ``nn.Linear`` with no hooks
it runs ``F.linear`` directly (what ``nn.Linear.forward`` would run), skipping ``nn.Module``'s call
bookkeeping, and says whether the output is fresh (seen by no hook: the caller may add into it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

tracing_state = torch._C._get_tracing_state  # JIT tracing in progress (None when not)


def plain_linear_params(base: nn.Module) -> Optional[dict]:
    """The ``_parameters`` of ``base`` when calling it would run just ``F.linear(x, weight, bias)``:
    an exact ``nn.Linear`` with no hooks (its own or global), no instance-level ``forward``, no
    ``torch.compile`` wrapper and no JIT tracing. Otherwise None.

    Layers use it to compute the base product themselves, without ``nn.Module``'s call
    bookkeeping, which on a CPU decode step costs about as much as a rank-16 GEMM. The module's
    state is read from its ``__dict__`` (``nn.Module`` attribute reads are several times slower
    than dict reads)."""
    if type(base) is nn.Linear:
        d = base.__dict__
        if (not (d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"] or d["_backward_hooks"])
                and d.get("_compiled_call_impl") is None and "forward" not in d
                and not (_torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks
                         or _torch_module._global_backward_pre_hooks or _torch_module._global_backward_hooks)
                and not tracing_state()):
            return d["_parameters"]
    return None


def call_base(base: nn.Module, x: Any, args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """``base(x, *args, **kwargs)``, and whether that output is fresh: made here, seen by no hook,
    so the caller may add into it in place. A plain ``nn.Linear`` (:func:`plain_linear_params`) is
    computed as ``F.linear`` directly; anything else goes through ``__call__``."""
    if not args and not kwargs:
        params = plain_linear_params(base)
        if params is not None:
            return F.linear(x, params["weight"], params["bias"]), True
    return base(x, *args, **kwargs), False


__all__ = ["call_base", "plain_linear_params", "tracing_state"]
