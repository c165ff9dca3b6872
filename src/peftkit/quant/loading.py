"""Loading a Hugging Face model folder layer by layer into a quantized model, and saving one.

:func:`load_quantized` builds the model with its parameters on the meta device and reads each
tensor on its own (:class:`SafetensorsReader`), quantizing every linear right after its weight is
read, so the float weights never all exist in memory at once. :func:`save_quantized` writes a
folder that :func:`load_quantized` reads back exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .._io import SafetensorsReader, atomic_write_bytes, save_tensors
from ..core.inject import adapter_layers
from ..core.targets import get_submodule_parent
from ..errors import CheckpointError, PeftkitError
from .bnb import is_bnb_module
from .layers import COMPUTE_DTYPES, NF4Linear, QuantizedLinear, compute_dtype_of
from .convert import format_class, format_options, mark_quantized, quant_args, quant_targets

QUANT_METHOD = "peftkit"  # quantization_config.quant_method of folders written by save_quantized
# save_quantized's weights file: not model.safetensors, so that transformers' from_pretrained, which
# would copy the integer codes into float weights, finds no weights to load and refuses the folder
QUANTIZED_WEIGHTS_NAME = "model.peftkit-quantized.safetensors"

Read = Callable[[str, tuple[int, ...]], torch.Tensor]  # (parameter name, expected shape) -> tensor


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a model folder: save_quantized's file, model.safetensors, or the shards
    of model.safetensors.index.json (CheckpointError if there are none)."""
    saved = os.path.join(model_dir, QUANTIZED_WEIGHTS_NAME)
    if os.path.isfile(saved):
        return [saved]
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        return [os.path.join(model_dir, f) for f in dict.fromkeys(weight_map.values())]
    raise CheckpointError(f"{model_dir} has no model.safetensors (or sharded index); load_quantized reads "
                          "safetensors folders only.")


class _FolderTensors:
    """The tensors of a model folder's safetensors file(s), read one at a time by model parameter name
    (with or without the model's ``base_model_prefix``). A context manager: closes its files on exit."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.prefix = ""
        self._readers = [SafetensorsReader(f) for f in checkpoint_files(model_dir)]
        self._where = {k: r for r in self._readers for k in r.entries}

    def __enter__(self) -> "_FolderTensors":
        return self

    def __exit__(self, *exc: Any) -> None:
        for r in self._readers:
            r.close()

    def key(self, name: str, required: bool = False) -> Optional[str]:
        """The file's key for parameter ``name``, or None (CheckpointError if ``required``)."""
        prefix = self.prefix
        for cand in (name, f"{prefix}.{name}" if prefix else None,
                     name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
            if cand is not None and cand in self._where:
                return cand
        if required:
            raise CheckpointError(f"{self.model_dir}: the checkpoint has no tensor for {name}.")
        return None

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor of parameter ``name``, checked to have ``shape``."""
        key = self.key(name, required=True)
        reader = self._where[key]
        if reader.entries[key][1] != tuple(shape):
            raise CheckpointError(f"{self.model_dir}: {key} has shape {reader.entries[key][1]}, the model "
                                  f"expects {tuple(shape)}.")
        return reader.read(key)


# ---------------------------------------------------------------------------------------------
# building the model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) and buffers on the CPU, so that
    computed non-persistent buffers (rotary frequencies) keep their values. Not thread-safe."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _read_config(model_dir: str, config_kwargs: dict) -> tuple[Any, Optional[dict]]:
    """The folder's transformers config and, for a save_quantized folder, its quantization_config
    (removed from the config); CheckpointError for a model quantized by another library."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, **config_kwargs)
    saved = getattr(config, "quantization_config", None)
    if isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
        delattr(config, "quantization_config")
        return config, saved
    if saved is not None:
        raise CheckpointError(f"{model_dir} holds a model quantized by another library ({saved!r}); "
                              "load_quantized reads float folders and folders written by save_quantized.")
    return config, None


def _build_on_meta(model_class: Any, config: Any) -> nn.Module:
    """``model_class.from_config(config)`` (default ``AutoModelForCausalLM``), parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    with parameters_on_meta():
        return model_class.from_config(config)


# ---------------------------------------------------------------------------------------------
# reading the tensors


def _load_and_quantize(model: nn.Module, cls: type[QuantizedLinear], options: dict, skip_modules: Sequence[str],
                       compute_dtype: Optional[torch.dtype], dtype: Optional[torch.dtype], read: Read,
                       model_dir: str) -> set[str]:
    """Read and quantize every target linear, one float layer in memory at a time; returns the keys read."""
    targets = quant_targets(model, skip_modules)
    for key, _, _, linear in targets:  # every check before the first read
        cls.check_weight(linear.weight, key, allow_meta=True, **options)
    loaded = set()
    for key, parent, attr, linear in targets:
        float_layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        weight = read(f"{key}.weight", tuple(linear.weight.shape))
        float_layer.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            bias = read(f"{key}.bias", tuple(linear.bias.shape))
            float_layer.bias = nn.Parameter(bias.to(dtype) if dtype is not None else bias, requires_grad=False)
        layer_dtype = compute_dtype or dtype or compute_dtype_of(weight.dtype)
        setattr(parent, attr, cls.from_linear(float_layer, compute_dtype=layer_dtype, key=key, **options))
        del float_layer, weight
        loaded |= {f"{key}.weight", f"{key}.bias"}
    return loaded


def _saved_layer(model: nn.Module, key: str, info: Any, model_dir: str) -> QuantizedLinear:
    """An empty quantized layer in the format a save_quantized config entry gives for linear ``key``."""
    try:
        linear = model.get_submodule(key)
        cls = format_class(info["bits"])
        opts = format_options(info["bits"], info.get("block_size", 64), info.get("double_quant", False))
        compute = getattr(torch, info["compute_dtype"])
    except (AttributeError, KeyError, TypeError, PeftkitError) as exc:
        raise CheckpointError(f"{model_dir}: bad quantization_config entry for {key!r} ({exc}).") from None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{model_dir}: {key} is not a linear layer of {type(model).__name__}.")
    return cls(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute, **opts)


def _load_saved_quantized(model: nn.Module, saved: dict, read: Read, model_dir: str) -> set[str]:
    """Rebuild the quantized linears listed in a save_quantized config and read their tensors."""
    loaded = set()
    modules = saved.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{model_dir}: quantization_config has no 'modules'; the folder is corrupt.")
    for key, info in modules.items():
        new = _saved_layer(model, key, info, model_dir)
        with torch.no_grad():
            for name, tensor in new.state_dict().items():
                value = read(f"{key}.{name}", tuple(tensor.shape))
                if value.dtype != tensor.dtype and not (name == "bias" and value.is_floating_point()):
                    raise CheckpointError(f"{model_dir}: {key}.{name} has dtype {value.dtype}, expected {tensor.dtype}.")
                if name == "bias":
                    new.bias = nn.Parameter(value, requires_grad=False)
                else:
                    getattr(new, name).copy_(value)
                loaded.add(f"{key}.{name}")
        parent, attr = get_submodule_parent(model, key)
        setattr(parent, attr, new)
    return loaded


def _load_other_tensors(model: nn.Module, names: set[str], tensors: _FolderTensors,
                        dtype: Optional[torch.dtype]) -> None:
    """Read the parameters and buffers ``names`` that the checkpoint holds (float ones cast to ``dtype``)."""
    for name in sorted(names):
        if tensors.key(name) is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._parameters:
            tensor = tensors.read(name, tuple(module._parameters[attr].shape))
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        elif attr in module._buffers and module._buffers[attr] is not None:
            module._buffers[attr] = tensors.read(name, tuple(module._buffers[attr].shape))


# ---------------------------------------------------------------------------------------------
# finishing the model


def _finish_loading(model: nn.Module, config: Any, model_dir: str) -> None:
    """Tie the weights, check that every parameter was loaded, switch to eval mode, and attach the
    folder's generation config and name."""
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{model_dir}: the checkpoint has no tensors for {len(missing)} parameters "
                              f"(e.g. {missing[:3]}); it does not match {type(model).__name__}.")
    model.eval()
    try:
        from transformers import GenerationConfig

        if getattr(model, "generation_config", None) is not None and \
                os.path.isfile(os.path.join(model_dir, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except Exception:  # generation settings are optional
        pass
    model.config._name_or_path = model_dir
    if hasattr(model, "name_or_path"):
        model.name_or_path = model_dir


def load_quantized(model_dir: Union[str, os.PathLike], bits: int = 4, model_class: Any = None, *,
                   block_size: int = 64, double_quant: bool = False, skip_modules: Sequence[str] = (),
                   compute_dtype: Optional[torch.dtype] = None, dtype: Optional[torch.dtype] = None,
                   **config_kwargs: Any) -> nn.Module:
    """Load a Hugging Face model folder, quantizing its linear layers one at a time as they are read.

    The model is built with its parameters on the meta device, then each tensor is read from the
    safetensors file(s) on its own; a linear layer's weight is quantized right after it is read, so
    the full-precision weights never all exist in memory at once (peak: the quantized model plus one
    float layer). The result equals ``quantize_model(model_class.from_pretrained(model_dir), ...)``.
    A folder written by :func:`save_quantized` loads as it was saved (its own format; the
    quantization arguments are then not used).

    Args:
        model_dir: a local folder with config.json and model.safetensors (or a sharded index).
        bits, block_size, double_quant, skip_modules, compute_dtype: as :func:`quantize_model`.
        model_class: a transformers Auto class or model class (default ``AutoModelForCausalLM``).
        dtype: cast the non-quantized float tensors (and the default compute dtype) to this dtype.
        config_kwargs: overrides passed to ``AutoConfig.from_pretrained``.
    """
    cls, options, skip_modules = quant_args(bits, block_size, double_quant, skip_modules, compute_dtype)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise PeftkitError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}.")
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir} is not a Hugging Face model folder (no config.json).")
    with _FolderTensors(model_dir) as tensors:
        config, saved = _read_config(model_dir, config_kwargs)
        model = _build_on_meta(model_class, config)
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in model.named_buffers()}
        tensors.prefix = getattr(model, "base_model_prefix", "") or ""
        if saved is not None:
            loaded = _load_saved_quantized(model, saved, tensors.read, model_dir)
        else:
            loaded = _load_and_quantize(model, cls, options, skip_modules, compute_dtype, dtype, tensors.read,
                                        model_dir)
        _load_other_tensors(model, names - loaded, tensors, dtype)
    _finish_loading(model, config, model_dir)
    if saved is not None:
        model.peftkit_quantization = {k: v for k, v in saved.items() if k not in ("quant_method", "modules")}
    else:
        mark_quantized(model, bits, options, skip_modules)
    return model


# ---------------------------------------------------------------------------------------------
# saving


def _check_savable(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The peftkit quantized layers of a model save_quantized can write (PeftkitError otherwise)."""
    if any(True for _ in adapter_layers(model)):
        raise PeftkitError("save_quantized needs a model without adapter layers: merge_and_unload() or unload() first.")
    modules = {k: m for k, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not modules:
        raise PeftkitError("save_quantized: the model has no peftkit quantized layer; use save_pretrained for float "
                           "models.")
    if any(is_bnb_module(m) for m in model.modules()):
        raise PeftkitError("save_quantized cannot write bitsandbytes layers; use transformers' save_pretrained.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise PeftkitError("save_quantized needs a transformers model (with a .config).")
    return modules


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied weights stored once (tie_weights restores them on load)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[name] = tensor.detach()
    return tensors


def _quantization_config(model: nn.Module, modules: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """The ``quantization_config`` save_quantized writes: the model's quantization record, the quant
    method and each quantized module's format."""
    entries = {}
    for key, m in modules.items():
        entry = {"bits": m.bits, "compute_dtype": str(m.compute_dtype).replace("torch.", "")}
        if isinstance(m, NF4Linear):
            entry.update(block_size=m.block_size, double_quant=m.double_quant)
        entries[key] = entry
    info = dict(getattr(model, "peftkit_quantization", {}) or {})
    info.update(quant_method=QUANT_METHOD, modules=entries)
    return info


def save_quantized(model: nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Write a quantized model (e.g. merged into its quantized weights) as a folder that
    :func:`load_quantized` reads back exactly: config.json with a ``quantization_config``
    (``quant_method: "peftkit"`` and each quantized module's format) and model.safetensors holding
    the codes and scales (in ``model.peftkit-quantized.safetensors``: transformers' own
    ``from_pretrained`` finds no weights file there and refuses the folder rather than loading the
    codes as float weights). Files are written atomically."""

    modules = _check_savable(model)
    os.makedirs(save_directory, exist_ok=True)
    tensors = _unique_tensors(model)
    info = _quantization_config(model, modules)
    save_tensors(tensors, os.path.join(save_directory, QUANTIZED_WEIGHTS_NAME))
    data = model.config.to_dict()
    data["quantization_config"] = info
    atomic_write_bytes(os.path.join(save_directory, "config.json"), (json.dumps(data, indent=2) + "\n").encode())
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(save_directory)
