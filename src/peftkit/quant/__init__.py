"""Frozen int8 / NF4 weights that LoRA (and DoRA, IA3) wrap like any Linear: the QLoRA base.

Two formats for the weight of a frozen ``nn.Linear``: **int8** with one absmax scale per output
channel, and **NF4** (4-bit NormalFloat, Dettmers et al. 2023) with one absmax scale per block of
``block_size`` weights, optionally double-quantized. Their definitions and error bounds are in
:mod:`peftkit.quant.formats`. The package's parts:

* :mod:`~peftkit.quant.formats`: the format math, pure functions on tensors;
* :mod:`~peftkit.quant.bnb`: the optional bitsandbytes bridge (its NF4 kernel on CUDA, its own
  ``Linear4bit`` / ``Linear8bitLt`` layers on any device);
* :mod:`~peftkit.quant.layers`: :class:`QuantizedLinear`, :class:`Int8Linear`, :class:`NF4Linear`;
* :mod:`~peftkit.quant.convert`: quantizing / dequantizing a whole model, merges into quantized weights;
* :mod:`~peftkit.quant.loading`: :func:`load_quantized` (layer by layer) and :func:`save_quantized`;
* :mod:`~peftkit.quant.kbit`: :func:`prepare_model_for_kbit_training`;
* :mod:`~peftkit.quant.dynamic`: post-training int8 dynamic quantization of a merged model for CPU
  inference (torchao), :func:`quantize_dynamic_int8`, :func:`save_dynamic_int8`, :func:`load_dynamic_int8`.

Public API: :func:`quantize_model`, :func:`load_quantized`, :func:`dequantize_model`,
:func:`prepare_model_for_kbit_training`, :class:`Int8Linear`, :class:`NF4Linear`.
"""

from .convert import dequantize_model, dequantized, quantize_model, quantized_bytes, requantization_report, requantize_weight_
from .dynamic import (
    DynamicInt8Report,
    is_dynamic_int8,
    load_dynamic_int8,
    quantize_dynamic_int8,
    save_dynamic_int8,
)
from .formats import (
    DOUBLE_QUANT_GROUP,
    NF4_LEVELS,
    NF4_MAX_ERROR,
    dequantize_int8,
    dequantize_nf4,
    dequantize_scales,
    nf4_levels_from_definition,
    quantize_int8,
    quantize_nf4,
    quantize_scales,
)
from .kbit import prepare_model_for_kbit_training
from .layers import (
    COMPUTE_DTYPES,
    FLOAT_DTYPES,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    dequantize_weight,
    is_quantized_module,
)
from .loading import QUANT_METHOD, QUANTIZED_WEIGHTS_NAME, load_quantized, save_quantized

__all__ = [
    "COMPUTE_DTYPES",
    "DynamicInt8Report",
    "DOUBLE_QUANT_GROUP",
    "FLOAT_DTYPES",
    "NF4_LEVELS",
    "NF4_MAX_ERROR",
    "QUANTIZED_WEIGHTS_NAME",
    "QUANT_METHOD",
    "Int8Linear",
    "NF4Linear",
    "QuantizedLinear",
    "dequantize_int8",
    "dequantize_model",
    "dequantized",
    "dequantize_nf4",
    "dequantize_scales",
    "dequantize_weight",
    "is_dynamic_int8",
    "is_quantized_module",
    "load_dynamic_int8",
    "load_quantized",
    "nf4_levels_from_definition",
    "prepare_model_for_kbit_training",
    "quantize_dynamic_int8",
    "quantize_int8",
    "quantize_model",
    "quantize_nf4",
    "quantize_scales",
    "quantized_bytes",
    "requantization_report",
    "requantize_weight_",
    "save_dynamic_int8",
    "save_quantized",
]
