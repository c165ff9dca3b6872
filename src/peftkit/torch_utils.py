"""Small tensor helpers that Hugging Face PEFT exports from ``peft.utils`` and code written against it
calls: the accelerator in use, a transpose for ``fan_in_fan_out`` weights, shifting decoder inputs,
tensor storage identity, and casting a model for mixed-precision training."""

from __future__ import annotations

import torch
from torch import nn


def infer_device() -> str:
    """``"cuda"``, ``"xpu"``, ``"mps"`` or ``"npu"`` when that accelerator is available, else ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda"
    for name in ("xpu", "mps", "npu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return name
    return "cpu"


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``weight.T`` when the layer stores it as (in, out) (transformers ``Conv1D``), else ``weight``."""
    return weight.T if fan_in_fan_out else weight


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: shifted one to the right, ``decoder_start_token_id`` first, -100 -> pad."""
    if pad_token_id is None:
        raise ValueError("shift_tokens_right needs pad_token_id (the model config's pad_token_id).")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def id_tensor_storage(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """(device, storage pointer, storage size): equal for tensors sharing memory (tied weights)."""
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.nbytes()


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (float16/bfloat16), trainable ones to float32, in place: the
    layout of mixed-precision adapter training."""
    for p in model.parameters():
        p.data = p.data.to(dtype if not p.requires_grad else torch.float32)


__all__ = ["cast_mixed_precision_params", "id_tensor_storage", "infer_device", "shift_tokens_right", "transpose"]
