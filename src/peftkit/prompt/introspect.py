"""What the soft-prompt engine reads off a transformers model: sizes from its config, and whether its
attention takes a key/value cache, is causal, or uses relative positions only."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

# the names attention modules give their key/value cache argument
CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")


def text_config(model: nn.Module) -> Any:
    """The model's (text) config: ``config.get_text_config()`` for multimodal configs."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "gettext_config"):
        try:
            return cfg.gettext_config()
        except Exception:  # pragma: no cover - unusual configs
            return cfg
    return cfg


def first_attr(cfg: Any, names: Sequence[str]) -> Optional[int]:
    """The first of ``names`` that ``cfg`` has as an int (configs name sizes differently)."""
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes a parameter called ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def takes_cache(model: nn.Module) -> bool:
    """Whether an attention module of ``model`` takes a key/value cache argument."""
    for module in model.modules():
        name = type(module).__name__.lower()
        if module is model or ("attention" not in name and "attn" not in name):
            continue
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            continue
        if any(a in params for a in CACHE_ARGS):
            return True
    return False


def is_causal(model: nn.Module) -> bool:
    """Whether ``model``'s self-attention is causal (a decoder); BERT-style encoders are not."""
    return any(getattr(m, "is_causal", None) is True for m in model.modules()
               if "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower())


def is_relative(cfg: Any) -> bool:
    """Models whose attention depends on relative positions only (T5's bucketed bias)."""
    return getattr(cfg, "relative_attention_num_buckets", None) is not None


__all__ = ["CACHE_ARGS", "accepts", "first_attr", "is_causal", "is_relative", "takes_cache", "text_config"]
