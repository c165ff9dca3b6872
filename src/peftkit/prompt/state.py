"""Saving and loading soft-prompt adapters: their state outside the layers (a registry ``ExtraState``).

``adapter_model.safetensors`` holds ``prompt_embeddings`` (the encoder's *output* for every virtual
token, as Hugging Face PEFT saves it) beside the trained heads (``base_model.<head>.*``, saved with
the layer tensors), so folders load in either library. A reparameterizing encoder (P-tuning,
prefix projection) also saves its own weights to ``peftkit_prompt_encoder.safetensors`` beside the
file, so that ``is_trainable=True`` resumes training through the encoder; Hugging Face PEFT ignores
that file. Without it (a folder written by Hugging Face PEFT) training continues on the saved prompt
directly, with a warning.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .._io import load_tensors
from ..errors import CheckpointError, PeftkitWarning
from ..registry import ExtraState, method_for
from .virtual import encoded_output

# Saved beside adapter_model.safetensors when an encoder reparameterizes the prompt (P-tuning, prefix
# projection): the encoder's own weights, so that training can resume. Hugging Face PEFT ignores it.
ENCODER_WEIGHTS_NAME = "peftkit_prompt_encoder.safetensors"
PROMPT_KEY = "prompt_embeddings"


def save_prompt(peft: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"prompt_embeddings": the encoder output for every virtual token}`` (on the CPU)."""
    return {PROMPT_KEY: encoded_output(peft.prompt_encoder[adapter_name]).detach().cpu()}


def encoder_files(peft: nn.Module, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The encoder's weights file, for reparameterizing encoders (else nothing)."""
    encoder = peft.prompt_encoder[adapter_name]
    if not getattr(encoder, "reparameterized", False):
        return {}
    return {ENCODER_WEIGHTS_NAME: {k: v.detach() for k, v in encoder.state_dict().items()}}


def load_prompt(peft: nn.Module, adapter_name: str, given: dict[str, torch.Tensor], source: str
                ) -> Callable[[], None]:
    """Take ``prompt_embeddings`` from ``given``, check it (and the encoder weights file beside
    ``source`` when the encoder reparameterizes the prompt), and return the function that loads it."""
    encoder = peft.prompt_encoder[adapter_name]
    if PROMPT_KEY not in given:
        raise CheckpointError(f"{source} has no 'prompt_embeddings' tensor; it is not a prompt-learning adapter "
                              "(or it is truncated).")
    prompt = given.pop(PROMPT_KEY)
    expected_shape = tuple(encoded_output(encoder).shape)
    if tuple(prompt.shape) != expected_shape:
        raise CheckpointError(
            f"{source}: prompt_embeddings has shape {tuple(prompt.shape)} but this adapter expects "
            f"{expected_shape}; the adapter was made for another model or config."
        )
    if not prompt.is_floating_point():
        raise CheckpointError(f"{source}: prompt_embeddings has dtype {prompt.dtype}, expected floating point.")
    reparameterized = getattr(encoder, "reparameterized", False)
    weights, why = read_encoder_weights(encoder, prompt, source) if reparameterized else (None, "")

    def commit() -> None:
        with torch.no_grad():
            if weights is not None:
                encoder.load_state_dict(weights)
            elif reparameterized:
                warnings.warn(f"{source}: {why}; training continues on the saved prompt directly, without the "
                              "encoder's reparameterization.", PeftkitWarning, stacklevel=4)
                _replace_with_encoded(peft, adapter_name, prompt)
            else:
                encoder.embedding.weight.copy_(prompt.to(encoder.embedding.weight))

    return commit


def read_encoder_weights(encoder: nn.Module, prompt: torch.Tensor, source: str
                         ) -> tuple[Optional[dict[str, torch.Tensor]], str]:
    """The encoder weights saved beside ``source`` if present and consistent with ``prompt``
    (else ``None`` and the reason)."""
    missing = f"no {ENCODER_WEIGHTS_NAME} beside it (Hugging Face PEFT saves only the encoded prompt)"
    if not os.path.isdir(source):
        return None, missing
    path = os.path.join(source, ENCODER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return None, missing
    weights = load_tensors(path)
    own = encoder.state_dict()
    if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
        return None, f"{ENCODER_WEIGHTS_NAME} does not fit this adapter's encoder"
    trial = copy.deepcopy(encoder)
    trial.load_state_dict(weights)
    trial.eval()
    with torch.no_grad():
        out = encoded_output(trial).float().cpu()
    ref = prompt.float().cpu()
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item())):
        return None, (f"{ENCODER_WEIGHTS_NAME} does not reproduce prompt_embeddings (the compatible file changed "
                      "after it was written)")
    return weights, ""


def _replace_with_encoded(peft: nn.Module, name: str, prompt: torch.Tensor) -> None:
    """Swap adapter ``name``'s encoder for one holding ``prompt`` directly (trainable as the old one was)."""
    config = peft.peft_config[name]
    old = peft.prompt_encoder[name]
    trainable = any(p.requires_grad for p in old.parameters())
    new = method_for(config).make_encoder(config, None, True)
    new.embedding.weight.data = prompt.detach().to(device=old.embedding.weight.device, dtype=torch.float32).clone()
    new.requires_grad_(trainable)
    peft.prompt_encoder[name] = new


PROMPT_STATE = ExtraState(save=save_prompt, load=load_prompt, files=encoder_files)

__all__ = ["ENCODER_WEIGHTS_NAME", "PROMPT_STATE", "encoder_files", "load_prompt", "read_encoder_weights",
           "save_prompt"]
