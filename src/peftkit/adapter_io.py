"""Reading an adapter folder for a PeftModel, and the small argument helpers of model.py (the model's
Hub name or folder, ``add_weighted_adapter``'s weights)."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import load_peft_weights
from .config import PeftConfig
from .errors import ConfigError, PeftkitError


def name_or_path(model: nn.Module) -> Optional[str]:
    """The model's ``name_or_path`` (its folder or Hub id), if it has one."""
    value = getattr(model, "name_or_path", None)
    if value is None:
        cfg = getattr(model, "config", None)
        value = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return value or None


def finite_weights(weights: Any) -> list[float]:
    """``add_weighted_adapter``'s ``weights`` as floats; PeftkitError unless each is a finite number."""
    try:
        if isinstance(weights, (str, bytes)) or any(isinstance(w, (str, bytes)) for w in weights):
            raise TypeError
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise PeftkitError(f"weights must be a list of numbers, one per adapter; got {weights!r}.") from None
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise PeftkitError(f"add_weighted_adapter weights must be finite numbers; got {bad}. Nothing was added.")
    return values


def read_adapter(model_id: str | os.PathLike, subfolder: Optional[str], revision: Optional[str], is_trainable: bool,
                  config: Optional[PeftConfig], hub_kwargs: dict[str, Any]) -> tuple[str, PeftConfig, dict[str, torch.Tensor]]:
    """Where an adapter is read from (for messages and files beside it), its config (``config`` itself if
    given, else the folder's; ``inference_mode`` unless trainable) and the tensors of an adapter folder or Hub repository. A local ``model_id/subfolder``
    is read as one path, so that files saved beside the adapter (a prompt encoder's) are found."""
    if subfolder and os.path.isdir(os.path.join(os.fspath(model_id), subfolder)):
        model_id, subfolder = os.path.join(os.fspath(model_id), subfolder), None
    if config is None:
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **hub_kwargs)
    elif not isinstance(config, PeftConfig):
        raise ConfigError(f"config must be a PeftConfig, got {type(config).__name__}.")
    config.inference_mode = not is_trainable  # a given config is used itself, as Hugging Face PEFT does
    weights = load_peft_weights(model_id, subfolder=subfolder, revision=revision, **hub_kwargs)
    return os.fspath(model_id), config, weights


__all__ = ["finite_weights", "name_or_path", "read_adapter"]
