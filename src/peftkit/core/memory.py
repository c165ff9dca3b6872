"""Checking that an adapter's tensors can be allocated, before allocating them.

An absurd size (``r=2**40``, ``num_virtual_tokens=10**7``, a bottleneck of a billion) would otherwise
fail deep inside PyTorch's allocator, or worse, be granted by an over-committing OS and then kill the
process when the initialisation touches the pages. :func:`check_new_tensors` refuses, with a
ConfigError saying which setting to lower, when one tensor would have more than
:data:`MAX_TENSOR_ELEMENTS` elements or all of them together more bytes than the device has free
(CPU: ``MemAvailable`` of ``/proc/meminfo``; CUDA: ``torch.cuda.mem_get_info``; other devices, such
as ``meta``, are not checked). Free memory is only looked up for tensors over
:data:`CHECK_FREE_ABOVE` bytes, so ordinary adapters cost nothing.

:func:`adapters_on_meta` is ``low_cpu_mem_usage``: inside it new adapter tensors are created on the
``meta`` device (no memory, no initialisation); loading a state dict then puts the file's tensors
in their place (:func:`peftkit.set_peft_model_state_dict` assigns them, on the base layer's device).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional, Union

import torch

from .._io import human_bytes
from ..errors import ConfigError

MAX_TENSOR_ELEMENTS = 2**31
CHECK_FREE_ABOVE = 2**26  # bytes
_ON_META: ContextVar[bool] = ContextVar("peftkit_adapters_on_meta", default=False)


@contextmanager
def adapters_on_meta(active: bool = True) -> Iterator[None]:
    """Inside: adapter layers create new adapter tensors on the ``meta`` device (``active=False``:
    no change). Nested uses keep the outer setting when inactive."""
    if not active:
        yield
        return
    token = _ON_META.set(True)
    try:
        yield
    finally:
        _ON_META.reset(token)


def creating_on_meta() -> bool:
    """Whether :func:`adapters_on_meta` is active here."""
    return _ON_META.get()


def free_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Bytes that can still be allocated on ``device``, or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_new_tensors(what: str, shapes: Sequence[tuple[int, ...]], device: Union[str, torch.device],
                      hint: str, element_size: int = 4) -> None:
    """ConfigError if tensors of ``shapes`` (``element_size`` bytes per element; adapters are kept in
    float32) cannot be allocated on ``device``. ``what`` names the adapter and setting, ``hint`` says
    what to do (e.g. "use a smaller r")."""
    numels = [math.prod(shape) for shape in shapes]
    if not numels:
        return
    biggest = max(range(len(numels)), key=numels.__getitem__)
    if numels[biggest] > MAX_TENSOR_ELEMENTS:
        raise ConfigError(f"{what} needs a tensor of shape {tuple(shapes[biggest])} ({numels[biggest]:,} elements); "
                          f"an adapter tensor of more than {MAX_TENSOR_ELEMENTS:,} elements is not plausible. {hint}.")
    total = sum(numels) * element_size
    if total <= CHECK_FREE_ABOVE:
        return
    free = free_bytes(device)
    if free is not None and total > free:
        raise ConfigError(f"{what} needs {human_bytes(total)} for its tensors, but {torch.device(device)} has "
                          f"{human_bytes(free)} free. {hint}.")


__all__ = ["CHECK_FREE_ABOVE", "MAX_TENSOR_ELEMENTS", "check_new_tensors", "free_bytes"]
