"""Preparing a quantized model for adapter training (as Hugging Face PEFT's function of the same name)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..errors import PeftkitWarning
from .layers import is_quantized_module


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Prepare a quantized model for adapter training, as Hugging Face PEFT does.

    1. freeze every parameter; 2. cast float16 / bfloat16 parameters that are not quantized to
    float32 (norms, embeddings, head); 3. if the model has quantized layers and
    ``use_gradient_checkpointing``: make the input embeddings' output require grad (needed by
    re-entrant checkpointing) and enable transformers' gradient checkpointing. Returns ``model``.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    quantized = any(is_quantized_module(m) for m in model.modules())
    if not (quantized and use_gradient_checkpointing):
        return model
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        warnings.warn(f"{type(model).__name__} has no gradient checkpointing support; continuing without it.",
                      PeftkitWarning, stacklevel=2)
        return model
    reentrant = kwargs.get("use_reentrant", True)
    kwargs["use_reentrant"] = reentrant
    if reentrant:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            def make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                output.requires_grad_(True)

            model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
    params = inspect.signature(enable).parameters
    if "activation_checkpointing_kwargs" in params:
        enable(activation_checkpointing_kwargs=kwargs)
    elif "gradient_checkpointing_kwargs" in params:
        enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable()
    return model
