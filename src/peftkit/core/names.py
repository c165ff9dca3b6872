"""Adapter names: what a new name may be, and reading the name arguments of the public API.

An adapter name is a key of ``ModuleDict``s (``lora_A[name]``) and, for every adapter but
``"default"``, the name of the sub-folder ``save_pretrained`` writes it into. So it must be plain:
letters, digits, ``_`` and ``-`` (no ``.``, no path separators, no ``..``), at most
:data:`MAX_NAME_LENGTH` characters, and not the mixed-batch row name ``"__base__"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import AdapterNameError
from .mixed import BASE_ADAPTER

MAX_NAME_LENGTH = 128


def check_plain_name(name: Any) -> None:
    """AdapterNameError unless ``name`` is a plain adapter name (see the module doc)."""
    if not isinstance(name, str):
        raise AdapterNameError(f"An adapter name must be a string, got {type(name).__name__} {name!r}.")
    plain = bool(name) and len(name) <= MAX_NAME_LENGTH and all(c.isalnum() or c in "_-" for c in name)
    if not plain or name == BASE_ADAPTER:
        raise AdapterNameError(
            f"Adapter name {name!r} is not valid: use 1 to {MAX_NAME_LENGTH} letters, digits, '_' or '-' (it names a "
            f"sub-folder when saved: no '.', '/', '\\' or spaces), other than {BASE_ADAPTER!r}."
        )


def check_new_name(name: Any, existing: Sequence[str]) -> None:
    """AdapterNameError unless ``name`` is a valid new adapter name (plain, and not taken)."""
    check_plain_name(name)
    if name in existing:
        raise AdapterNameError(f"An adapter named {name!r} already exists; choose another name or delete it first.")


def name_list(value: Any, what: str) -> list[str]:
    """``value`` (one adapter name or a sequence of names) as a list; AdapterNameError for other types."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(n, str) for n in value):
        return list(value)
    raise AdapterNameError(f"{what} takes an adapter name or a list of adapter names, got {type(value).__name__} "
                           f"{value!r}.")


__all__ = ["MAX_NAME_LENGTH", "check_new_name", "check_plain_name", "name_list"]
