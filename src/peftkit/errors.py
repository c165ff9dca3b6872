"""Every user-facing failure of peftkit raises a :class:`PeftkitError` (a ``ValueError``).

The message says what was wrong and what to do about it. The subclasses let callers catch one
family of failures without string matching.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftkitError(ValueError):
    """Base class of all peftkit errors."""


class ConfigError(PeftkitError):
    """A config field has a wrong value or type, or the config belongs to another method."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field has a value of the wrong type (also a ``TypeError``, as Hugging Face PEFT raises)."""


class TargetError(PeftkitError):
    """No module of the model matched the requested targets, or a target cannot be adapted."""


class AdapterNameError(PeftkitError, KeyError):
    """An adapter name is unknown, or a new adapter name is already taken."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(PeftkitError):
    """An adapter folder or checkpoint is missing, truncated, corrupt or does not fit the model."""


class MergeError(PeftkitError, RuntimeError):
    """A merge or unmerge cannot be done (unsupported layer, NaN weights with safe_merge, ...); also a
    ``RuntimeError``, as Hugging Face PEFT raises some of these."""


class HotswapError(PeftkitError, RuntimeError):
    """An adapter cannot be hot-swapped into another's tensors (other method or settings, other
    targets, merged). Also a ``RuntimeError``, as Hugging Face PEFT raises for unexpected keys."""


class PeftkitWarning(UserWarning):
    """Category of peftkit's warnings (unknown config fields, inexact operations, ...)."""


class PatternWarning(PeftkitWarning, RuntimeWarning):
    """A config entry matched nothing and was ignored (a ``rank_pattern`` key, ``target_parameters``);
    also a ``RuntimeWarning``, as Hugging Face PEFT warns."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates that look most like ``name`` (for "did you mean" messages)."""
    candidates = list(dict.fromkeys(candidates))
    short = {c.rsplit(".", 1)[-1]: c for c in candidates}
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    hits += [short[s] for s in difflib.get_close_matches(name, list(short), n=n, cutoff=0.4)]
    return list(dict.fromkeys(hits))[:n]
