"""Quantizing and dequantizing a whole model in place, merges into quantized weights
(requantization and its error report), and the argument checks shared with the loader."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..errors import MergeError, PeftkitError, PeftkitWarning
from ..core.layer import AdapterLayer
from ..core.modules_to_save import ModulesToSaveWrapper
from ..core.targets import get_submodule_parent, linear_module_names
from .layers import (
    COMPUTE_DTYPES,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    check_block_size,
    dequantize_weight,
    is_quantized_module,
)


def quant_args(bits: Any, block_size: Any, double_quant: Any, skip_modules: Any,
               compute_dtype: Optional[torch.dtype]) -> tuple[type[QuantizedLinear], dict, Sequence[str]]:
    """Checked arguments shared by quantize_model and load_quantized: the layer class, its options
    and ``skip_modules`` as a list."""
    cls = format_class(bits)
    options = format_options(bits, block_size, double_quant)
    _check_compute_dtype(compute_dtype)
    return cls, options, [skip_modules] if isinstance(skip_modules, str) else skip_modules


def format_class(bits: Any) -> type[QuantizedLinear]:
    """The layer class for ``bits`` (4: NF4Linear, 8: Int8Linear); PeftkitError for anything else."""
    if isinstance(bits, bool) or bits not in (4, 8):
        raise PeftkitError(f"bits must be 4 (NF4) or 8 (int8), got {bits!r}.")
    return NF4Linear if bits == 4 else Int8Linear


def format_options(bits: int, block_size: int, double_quant: bool) -> dict[str, Any]:
    """The checked constructor options of the ``bits`` format (NF4: block_size, double_quant; int8: none)."""
    if bits == 4:
        check_block_size(block_size)
        return {"block_size": block_size, "double_quant": bool(double_quant)}
    if double_quant:
        raise PeftkitError("double_quant applies to 4-bit (NF4) block scales only; int8 has one scale per row.")
    return {}


def _check_compute_dtype(compute_dtype: Optional[torch.dtype]) -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise PeftkitError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype!r}.")


def _skipped(key: str, skip_modules: Sequence[str]) -> bool:
    """``key`` is a skipped module or inside one (names match whole dotted components)."""
    padded = "." + key + "."
    return any(("." + s + ".") in padded for s in skip_modules)


def quant_targets(model: nn.Module, skip_modules: Sequence[str]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(key, parent, attribute, linear) of every plain nn.Linear to quantize (the output head excluded)."""
    targets = []
    for key in sorted(linear_module_names(model)):
        if _skipped(key, skip_modules):
            continue
        module = model.get_submodule(key)
        if isinstance(module, ModulesToSaveWrapper):
            continue  # trained in full
        parent, attr = get_submodule_parent(model, key)
        while isinstance(module, AdapterLayer):  # quantize the base of an adapter layer
            parent, attr, module = module, "base_layer", module.base_layer
        if type(module) is not nn.Linear or isinstance(parent, nn.MultiheadAttention):
            continue  # transformers Conv1D, MHA's out_proj (read as a raw weight), custom subclasses
        targets.append((key, parent, attr, module))
    return targets


def quantize_model(model: nn.Module, bits: int = 4, block_size: int = 64, double_quant: bool = False,
                   skip_modules: Sequence[str] = (), compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Quantize every frozen ``nn.Linear`` of ``model`` in place (except the output head and ``skip_modules``).

    Args:
        bits: 8 (int8, per-output-channel absmax) or 4 (NF4, blockwise absmax).
        block_size: NF4 block length along a row (must divide every quantized layer's in_features).
        double_quant: also quantize the NF4 block scales (int8, groups of 256): 0.127 instead of 0.5
            extra bits per weight at block_size 64.
        skip_modules: module names (a name matches whole dotted components, e.g. ``"down_proj"`` or
            ``"layers.0"``) kept in full precision.
        compute_dtype: dtype of the matmuls (default: each weight's own dtype).

    Every check (bits, block size, dtypes, an already quantized model) runs before the first layer
    is touched. Layers are converted one at a time, so peak memory grows by one layer's worth.
    Returns ``model``.
    """
    cls, options, skip_modules = quant_args(bits, block_size, double_quant, skip_modules, compute_dtype)
    already = [k for k, m in model.named_modules() if is_quantized_module(m)]
    if already:
        raise PeftkitError(f"The model is already quantized ({already[0]} is {type(model.get_submodule(already[0])).__name__}); "
                           "quantize a float model, or dequantize_model() it first.")
    targets = quant_targets(model, skip_modules)
    if not targets:
        raise PeftkitError("quantize_model found no nn.Linear to quantize (the output head and skip_modules are never "
                           "quantized).")
    for key, _, _, linear in targets:
        cls.check_weight(linear.weight, key, **options)
    for key, parent, attr, linear in targets:
        setattr(parent, attr, cls.from_linear(linear, compute_dtype=compute_dtype, key=key, **options))
    mark_quantized(model, bits, options, skip_modules)
    return model


def mark_quantized(model: nn.Module, bits: int, options: dict, skip_modules: Sequence[str]) -> None:
    """Record the quantization arguments on the model (``model.peftkit_quantization``)."""
    model.peftkit_quantization = {"bits": bits, **options, "skip_modules": list(skip_modules)}


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every quantized linear (peftkit, or bitsandbytes when installed) by an ``nn.Linear``
    holding its dequantized weight Ŵ, in place. Adapter layers keep wrapping the new float base.
    Returns ``model``."""
    for key, module in list(model.named_modules()):
        if not key or not is_quantized_module(module):
            continue
        if isinstance(module, QuantizedLinear):
            new = module.to_linear(dtype)
        else:  # bitsandbytes
            weight = dequantize_weight(module, dtype or torch.float32)
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
        parent, attr = get_submodule_parent(model, key)
        setattr(parent, attr, new)
    for _, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            module.clear_cache()
    if hasattr(model, "peftkit_quantization"):
        del model.peftkit_quantization
    return model


@contextlib.contextmanager
def dequantized(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[nn.Module]:
    """:func:`dequantize_model` for the block; if the block raises, the quantized modules (and the
    model's ``peftkit_quantization`` record) are put back, so a failed merge leaves the model as it was."""
    originals = [(key, module) for key, module in model.named_modules() if key and is_quantized_module(module)]
    record = getattr(model, "peftkit_quantization", None)
    dequantize_model(model, dtype)
    try:
        yield model
    except BaseException:
        for key, module in originals:
            parent, attr = get_submodule_parent(model, key)
            setattr(parent, attr, module)
        if record is not None:
            model.peftkit_quantization = record
        for _, module in model.named_modules():
            if isinstance(module, AdapterLayer):
                module.clear_cache()
        raise


def requantize_weight_(module: nn.Module, weight: torch.Tensor) -> dict[str, float]:
    """Store ``weight`` into a quantized linear (requantizing); returns the error introduced."""
    if isinstance(module, QuantizedLinear):
        return module.requantize_(weight)
    raise MergeError(f"Merging into {type(module).__name__} weights (bitsandbytes) is not supported by peftkit; "
                     "use merge_and_unload(dequantize=True) for a float model.")


def requantization_report(model: nn.Module, warn: bool = True) -> Optional[dict[str, Any]]:
    """Summary of the errors introduced by merges into quantized weights since the last report.

    Returns None if no layer was requantized, else ``{"layers", "max_abs", "max_rel", "mean_rel",
    "per_layer": {key: stats}}``; with ``warn`` a PeftkitWarning states the figures."""
    per_layer = {}
    for key, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module._requantized_pending:
            per_layer[key] = dict(module.requantization_error or {})
            module._requantized_pending = False
    if not per_layer:
        return None
    rels = [s["rel"] for s in per_layer.values()]
    report = {
        "layers": len(per_layer),
        "max_abs": max(s["max_abs"] for s in per_layer.values()),
        "max_rel": max(rels),
        "mean_rel": sum(rels) / len(rels),
        "per_layer": per_layer,
    }
    if warn:
        warnings.warn(
            f"Merged into quantized weights: requantizing {report['layers']} layers introduced an error of max "
            f"|ΔW| = {report['max_abs']:.3g}, relative ‖ΔW‖/‖W‖ = {report['mean_rel']:.3g} on average "
            f"(worst {report['max_rel']:.3g}). Use merge_and_unload(dequantize=True) for an exact float model.",
            PeftkitWarning, stacklevel=3)
    return report


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights and scales of ``model`` (biases and float layers excluded)."""
    return sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
