"""Undoing edits of base weights when creating an adapter fails half-way.

Creating an adapter normally leaves the base model's tensors alone, so undoing it is unwrapping.
A few inits rewrite base weights (PiSSA stores the residual ``W - s·B·A``); an error after such a
write (a later target that cannot be adapted, an unknown ``modules_to_save``, a checkpoint that does
not fit) must leave the base as it was. Code that edits a base module in place calls
:func:`record_base_edit` first; inside :func:`undo_base_edits_on_error` that module's own tensors are
copied once, and put back if the block raises. Outside it, recording does nothing (and copies
nothing). Nested blocks join the outermost one, which alone restores.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

_JOURNAL: contextvars.ContextVar[Optional[list[tuple[nn.Module, dict[str, torch.Tensor]]]]] = (
    contextvars.ContextVar("peftkit_base_edits", default=None))


def record_base_edit(module: nn.Module) -> None:
    """Call before changing ``module``'s own parameters or buffers in place: copies them (once per
    module) when an :func:`undo_base_edits_on_error` block is open."""
    journal = _JOURNAL.get()
    if journal is None or any(m is module for m, _ in journal):
        return
    # copied to the CPU: an accelerator's memory is the scarcer one (a copy of every rewritten weight
    # is held until the adapter is complete)
    saved = {name: t.detach().to("cpu", copy=True) for name, t in module.named_parameters(recurse=False)}
    saved.update({name: t.detach().to("cpu", copy=True) for name, t in module.named_buffers(recurse=False)})
    journal.append((module, saved))


@contextlib.contextmanager
def undo_base_edits_on_error() -> Iterator[None]:
    """Inside the block, base modules passed to :func:`record_base_edit` get their tensors back,
    bit for bit, if the block raises."""
    if _JOURNAL.get() is not None:  # an outer block restores
        yield
        return
    journal: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    token = _JOURNAL.set(journal)
    try:
        yield
    except BaseException:
        _restore(journal)
        raise
    finally:
        _JOURNAL.reset(token)


def _restore(journal: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    with torch.no_grad():
        for module, saved in reversed(journal):
            for name, value in saved.items():
                current = getattr(module, name, None)
                if isinstance(current, torch.Tensor) and current.shape == value.shape and current.dtype == value.dtype:
                    current.copy_(value)
                elif isinstance(current, torch.Tensor):
                    current.data = value.to(current.device)
                else:
                    setattr(module, name, value)


__all__ = ["record_base_edit", "undo_base_edits_on_error"]
