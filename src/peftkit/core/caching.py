"""A process-wide switch for caches of values derived from adapter weights (DoRA's weight norm).

Off by default. :class:`peftkit.helpers.DoraCaching` turns it on (as a context manager, or for good
by calling it). A layer caches only while the switch is on and it is in eval mode; it drops its
cache when it runs with the switch off and whenever it is put in train or eval mode, and a cached
value is also keyed by the versions of the tensors it was computed from, so a weight changed in
place (a hot-swap, an optimizer step) is never served stale.
"""

from __future__ import annotations

_ENABLED = [False]


def weight_caching_enabled() -> bool:
    """Whether layers may cache values derived from their weights (in eval mode)."""
    return _ENABLED[0]


def set_weight_caching(enabled: bool) -> bool:
    """Turn the switch on or off; returns the previous setting."""
    previous, _ENABLED[0] = _ENABLED[0], bool(enabled)
    return previous


__all__ = ["set_weight_caching", "weight_caching_enabled"]
