"""Post-training int8 dynamic quantization of a (merged, plain) model for CPU inference, and its folder.

For the frozen QLoRA base see :mod:`peftkit.quant.layers`; this module is for deployment: a model
whose adapter has been merged (``merge_and_unload()``) becomes a smaller model whose linears run int8
matmuls. For every quantized ``nn.Linear`` computing ``y = x Wᵀ + b`` (W: out x in):

* the weight, once, per output channel ``o`` (symmetric absmax): ``s_o = max_i |W[o, i]| / 127.5``,
  ``Q[o, i] = clamp(round(W[o, i] / s_o), -128, 127)`` stored as int8 (1 byte per weight plus one
  float scale per row instead of 4 bytes per weight in float32);
* the activation, at every forward, per token ``t`` (the "dynamic" part, no calibration data):
  ``a_t = max_i |x[t, i]| / 127.5``, ``q[t, i] = clamp(round(x[t, i] / a_t), -128, 127)``;
* ``y[t, o] ≈ a_t · s_o · Σ_i q[t, i] Q[o, i] + b_o``, the sum accumulated in int32.

Each factor is off by at most half a step (``|x - a·q| <= a/2``, ``|W - s·Q| <= s/2``); on the
bundled model the logits move by 1.2 % (relative Frobenius norm over a batch of E2E texts) and the
top-1 token is the float model's at 97 % of the positions.
The output head (``lm_head``), embeddings and norms stay in float: the head of a model with tied
embeddings shares its weight with the input embedding, and quantizing it would untie the two.

Why torchao (``Int8DynamicActivationInt8WeightConfig`` + ``quantize_``; ``torchao==0.18.0``, the ``deploy`` extra):
it is PyTorch's maintained quantization library; ``torch.ao.quantization.quantize_dynamic``, the older
eager API, warns that it is deprecated and will be removed ("migrate to torchao's quantize_") and its
modules hold packed fbgemm parameters that neither safetensors nor transformers can store. torchao's
int8 weights are tensor subclasses (``Int8Tensor``) of an ordinary ``nn.Linear``, so the model keeps
its classes, and transformers reads and writes them itself (``TorchAoConfig``): the folder written
by :func:`save_dynamic_int8` (config.json with a torchao ``quantization_config``, a flattened
``model.safetensors``) loads with ``AutoModelForCausalLM.from_pretrained`` alone when torchao is
installed. Speed on a CPU (bench/bench_ptq.py, one thread, batch 8 x 128): on a 58M-parameter
Llama (hidden 512) eager int8 ran 1.36x as fast as float32 (torch.ao's fbgemm kernels 1.54x, with
3x its logit error), and 1.7x under ``torch.compile``, which fuses the activation quantization and
rescaling around the int32 ``_int_mm``; on the tiny bundled model the per-call overhead of the
quantization dominates and eager int8 is slower than float32 (0.6x). The weights take 0.39x the
bytes on the bundled model, 0.67x on the mid one, whose float embeddings and head are most of it.

:func:`save_dynamic_int8` also writes ``peftkit_quantization.json`` (the format, the library and
versions, the quantized modules); :func:`load_dynamic_int8` reads only folders that have it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .._io import atomic_write_bytes, make_folder, save_tensors
from ..core.layer import AdapterLayer
from ..errors import CheckpointError, ConfigError, PeftkitError, PeftkitWarning
from .layers import is_quantized_module

INT8_DYNAMIC_FORMAT = "int8-dynamic"  # the "format" of the marker file
MARKER_NAME = "peftkit_quantization.json"  # the marker file of a save_dynamic_int8 folder
WEIGHTS_NAME = "model.safetensors"
TORCHAO_PIN = "torchao>=0.18"


@dataclass(frozen=True)
class DynamicInt8Report:
    """What :func:`quantize_dynamic_int8` did.

    Attributes:
        quantized: names of the ``nn.Linear`` modules now holding int8 weights.
        skipped: name -> reason of every ``nn.Linear`` left in float.
        float_bytes: bytes of the quantized weights before (their float dtype).
        int8_bytes: bytes of the same weights after (int8 values, scales and zero points).
    """

    quantized: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    float_bytes: int = 0
    int8_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"quantized": list(self.quantized), "skipped": dict(self.skipped),
                "float_bytes": self.float_bytes, "int8_bytes": self.int8_bytes}


def torchao_version() -> Optional[str]:
    """The installed torchao's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet_import_logs() -> Iterator[None]:
    """torchao's import logs a warning per CUDA-only extension it cannot load on a CPU build of torch,
    and torch one per enum torchao registers with pytree: noise for a CPU user, silenced while importing."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao() -> Any:
    """The torchao package, or a PeftkitError saying how to install it."""
    if torchao_version() is None:
        raise PeftkitError(f"int8 dynamic quantization needs torchao: pip install '{TORCHAO_PIN}'.")
    with _quiet_import_logs():
        import torchao
        import torchao.quantization  # noqa: F401
        import torchao.prototype.safetensors.safetensors_support  # noqa: F401
    return torchao


def int8_config() -> Any:
    """torchao's config of the format: int8 per-token activations, int8 per-channel weights (symmetric).
    ``set_inductor_config=False``: quantizing does not change torch.compile's global settings."""
    torchao = _torchao()
    return torchao.quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _is_torchao_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and type(t).__module__.startswith("torchao.")


def is_dynamic_int8(model: nn.Module) -> bool:
    """``model`` holds torchao int8 weights (quantized by :func:`quantize_dynamic_int8` or loaded)."""
    return any(_is_torchao_tensor(p) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# quantizing


def _skip_list(skip_modules: Any) -> list[str]:
    names = [skip_modules] if isinstance(skip_modules, str) else skip_modules
    try:
        names = list(names)
    except TypeError:
        raise ConfigError(f"skip_modules must be a module name or a list of them, got {skip_modules!r}.") from None
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"skip_modules must hold non-empty module names, got {skip_modules!r}.")
    return names


def _inside(key: str, name: str) -> bool:
    """``key`` is module ``name`` or inside it (whole dotted components: ``"layers.1"`` is not ``"layers.10"``)."""
    return ("." + name + ".") in ("." + key + ".")


def _check_model(model: Any) -> None:
    """PeftkitError unless ``model`` is a plain float model: no adapter layers (merge first), no
    peftkit / bitsandbytes quantized linears (the QLoRA base), no torchao weights, nothing on meta."""
    if not isinstance(model, nn.Module):
        raise PeftkitError(f"quantize_dynamic_int8 takes a torch nn.Module, got {type(model).__name__}.")
    for key, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            raise PeftkitError(f"The model still has adapter layers ({key or type(model).__name__} is "
                               f"{type(module).__name__}); merge them first: model = model.merge_and_unload() "
                               "(or `peftkit merge`), then quantize the merged model.")
        if is_quantized_module(module):
            raise PeftkitError(f"The model is already quantized for QLoRA ({key} is {type(module).__name__}); "
                               "int8 dynamic quantization starts from float weights: dequantize_model(model) or "
                               "merge_and_unload(dequantize=True) first.")
    if getattr(model, "peft_config", None):
        raise PeftkitError(f"{type(model).__name__} carries adapters (peft_config); merge them first: "
                           "model = model.merge_and_unload(). Soft-prompt adapters cannot be merged.")
    for name, p in model.named_parameters():
        if _is_torchao_tensor(p):
            raise PeftkitError(f"The model is already quantized ({name} is a {type(p).__name__}).")
        if p.is_meta:
            raise PeftkitError(f"{name} is on the meta device (not loaded); load the model's weights first.")


def _targets(model: nn.Module, skip: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The names of the ``nn.Linear`` modules to quantize, and why each other one is not."""
    tied: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), name)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    targets, skipped = [], {}
    for key, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
        hit = next((s for s in skip if _inside(key, s)), None)
        if hit is not None:
            skipped[key] = f"skip_modules {hit!r}"
        elif type(module) is not nn.Linear:
            skipped[key] = f"a subclass of nn.Linear ({type(module).__name__})"
        elif isinstance(parent, nn.MultiheadAttention):
            skipped[key] = "nn.MultiheadAttention reads its weight directly"
        elif not module.weight.is_floating_point():
            skipped[key] = f"weight dtype {module.weight.dtype}"
        elif counts[id(module.weight)] > 1:
            skipped[key] = f"weight tied to {tied[id(module.weight)]}"
        else:
            targets.append(key)
    return targets, skipped


def _tensor_bytes(t: torch.Tensor) -> int:
    if _is_torchao_tensor(t):
        names = list(getattr(t, "tensor_data_names", ())) + list(getattr(t, "optional_tensor_data_names", ()))
        return sum(_tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def check_quantizable(model: Any, skip_modules: Union[str, Sequence[str]] = ("lm_head",)
                      ) -> tuple[list[str], dict[str, str]]:
    """Every check of :func:`quantize_dynamic_int8`, changing nothing: PeftkitError for a model with
    adapter layers (merge first), a QLoRA base, torchao weights, weights on meta, bad ``skip_modules``
    or nothing to quantize. Returns the names of the linears to quantize and why each other is not."""
    _check_model(model)
    skip = _skip_list(skip_modules)
    names = [k for k, _ in model.named_modules()]
    for s in skip:
        if s != "lm_head" and not any(_inside(k, s) for k in names):
            from ..errors import closest

            hint = closest(s, names)
            raise ConfigError(f"skip_modules {s!r} matches no module of the model"
                              + (f" (did you mean {', '.join(map(repr, hint[:3]))}?)." if hint else "."))
    targets, skipped = _targets(model, skip)
    if not targets:
        conv1d = [k for k, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        left = ", ".join(f"{k}: {r}" for k, r in skipped.items())
        raise PeftkitError("quantize_dynamic_int8 found no nn.Linear to quantize"
                           + (f" (left in float: {left})" if skipped else "")
                           + (f"; transformers Conv1D layers ({conv1d[0]}, ...: GPT-2 style) are not supported"
                              if conv1d else "") + ".")
    return targets, skipped


def quantize_dynamic_int8(model: nn.Module, *, skip_modules: Union[str, Sequence[str]] = ("lm_head",)
                          ) -> DynamicInt8Report:
    """Quantize every ``nn.Linear`` of ``model`` to int8 weights with int8 dynamic activations, in place.

    Args:
        model: a float model without adapter layers (merge them first) and not quantized for QLoRA.
        skip_modules: module names kept in float (a name matches whole dotted components, e.g.
            ``"lm_head"``, ``"mlp"``, ``"layers.0"``). A name other than the default that matches no
            module is a ConfigError.

    Left in float as well, with the reason in the report: subclasses of ``nn.Linear``, the output
    projection of ``nn.MultiheadAttention``, and linears whose weight is shared with another module
    (tied). Modules of other types (embeddings, transformers ``Conv1D``) are not touched. Every
    check (:func:`check_quantizable`) runs before the first weight changes; a refused model is left
    as it was.
    """
    targets, skipped = check_quantizable(model, skip_modules)
    float_bytes = sum(_tensor_bytes(model.get_submodule(k).weight) for k in targets)
    wanted = set(targets)
    config = int8_config()
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted)
    int8_bytes = sum(_tensor_bytes(model.get_submodule(k).weight) for k in targets)
    return DynamicInt8Report(quantized=tuple(targets), skipped=skipped, float_bytes=float_bytes,
                             int8_bytes=int8_bytes)


# ---------------------------------------------------------------------------------------------
# the folder


def _quantized_names(model: nn.Module) -> list[str]:
    return [k for k, m in model.named_modules()
            if isinstance(m, nn.Linear) and _is_torchao_tensor(m.weight)]


def _marker(model: nn.Module, quantized: list[str]) -> dict[str, Any]:
    import transformers

    from ..version import __version__

    return {"format": INT8_DYNAMIC_FORMAT, "library": "torchao", "torchao": torchao_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peftkit": __version__,
            "weights": WEIGHTS_NAME, "model_class": type(model).__name__, "quantized_modules": quantized}


def _hf_config(model: nn.Module, quantized: list[str]) -> Any:
    """A copy of ``model.config`` naming the class, the dtype and torchao's quantization_config (with
    every float linear in ``modules_to_not_convert``), as transformers' own torchao folders do."""
    from transformers import TorchAoConfig

    config = copy.deepcopy(model.config)
    done = set(quantized)
    keep = [k for k, m in model.named_modules() if isinstance(m, nn.Linear) and k not in done]
    config.quantization_config = TorchAoConfig(int8_config(), modules_to_not_convert=keep)
    config.architectures = [type(model).__name__]
    float_dtypes = [p.dtype for p in model.parameters() if not _is_torchao_tensor(p) and p.is_floating_point()]
    if float_dtypes:
        config.dtype = str(float_dtypes[0]).split(".")[-1]
    return config


def _state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state flattened for safetensors (torchao's format); tied duplicates dropped, as
    transformers does (the config's ``tie_word_embeddings`` ties them again on loading)."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = model.state_dict()
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    every |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    state = {k: v for k, v in state.items() if k in unique or k not in every}
    return flatten_tensor_state_dict(state)


def save_dynamic_int8(model: nn.Module, folder: Union[str, os.PathLike], tokenizer: Any = None) -> None:
    """Write an int8 dynamic model (from :func:`quantize_dynamic_int8`) as a Hugging Face folder.

    The folder holds ``config.json`` (with torchao's ``quantization_config``), ``model.safetensors``
    (torchao's flattened int8 tensors, and the float ones), ``generation_config.json`` for a
    generative model, the tokenizer if given, and :data:`MARKER_NAME`, written last. It loads with
    :func:`load_dynamic_int8`, or with transformers' ``from_pretrained`` when torchao is installed.
    ``folder`` must be empty, new, or an earlier such folder.
    """
    if not isinstance(model, nn.Module) or not is_dynamic_int8(model):
        raise PeftkitError("save_dynamic_int8 saves a model quantized by quantize_dynamic_int8; quantize it first.")
    if not hasattr(getattr(model, "config", None), "to_json_string"):
        raise PeftkitError(f"save_dynamic_int8 writes Hugging Face model folders; {type(model).__name__} has no "
                           "transformers config.")
    folder = os.fspath(folder)
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, MARKER_NAME)):
        raise CheckpointError(f"{folder} is not empty; save_dynamic_int8 writes into a new or empty folder.")
    quantized = _quantized_names(model)
    config = _hf_config(model, quantized)
    tensors, metadata = _state_tensors(model)
    make_folder(folder)
    marker = os.path.join(folder, MARKER_NAME)
    if os.path.exists(marker):
        os.remove(marker)  # rewritten last: a folder caught half-written is not taken for a finished one
    save_tensors(tensors, os.path.join(folder, WEIGHTS_NAME), metadata=metadata)
    atomic_write_bytes(os.path.join(folder, "config.json"), config.to_json_string(use_diff=True).encode())
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        atomic_write_bytes(os.path.join(folder, "generation_config.json"),
                           generation.to_json_string(use_diff=True).encode())
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    atomic_write_bytes(marker, (json.dumps(_marker(model, quantized), indent=2) + "\n").encode())


def _not_ours(folder: str) -> str:
    """Why ``folder`` (without a marker) is not an int8 dynamic folder, and what to do."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return f"{folder} is not a model folder (no config.json and no {MARKER_NAME})."
    try:
        with open(path, encoding="utf-8") as fh:
            qc = json.load(fh).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return f"{folder}/config.json cannot be read as JSON."
    if isinstance(qc, dict) and qc.get("quant_method") == "peftkit":
        return (f"{folder} holds a peftkit QLoRA base (written by save_quantized), not an int8 dynamic model; "
                "load it with peftkit.load_quantized.")
    if isinstance(qc, dict):
        return (f"{folder} holds a model quantized by {qc.get('quant_method')!r} without peftkit's {MARKER_NAME}; "
                "load it with transformers' from_pretrained.")
    return (f"{folder} holds a float model, not an int8 dynamic one; quantize it with quantize_dynamic_int8 "
            "or `peftkit quantize --int8`, or load it with from_pretrained.")


def read_marker(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """The marker of a :func:`save_dynamic_int8` folder; CheckpointError for any other folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder.")
    path = os.path.join(folder, MARKER_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(_not_ours(folder))
    try:
        with open(path, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}).") from None
    if not isinstance(marker, dict) or marker.get("format") != INT8_DYNAMIC_FORMAT:
        fmt = marker.get("format") if isinstance(marker, dict) else marker
        raise CheckpointError(f"{folder} holds the format {fmt!r}; load_dynamic_int8 reads {INT8_DYNAMIC_FORMAT!r}.")
    return marker


def _model_class(folder: str, model_class: Any) -> Any:
    if model_class is not None:
        return model_class
    import transformers
    from transformers import AutoConfig

    arch = (getattr(AutoConfig.from_pretrained(folder), "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls or transformers.AutoModelForCausalLM


def _check_weights_file(path: str) -> None:
    """CheckpointError unless ``path`` is a readable safetensors file holding torchao's flattened tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({exc}).") from None
    if "tensor_names" not in metadata:
        raise CheckpointError(f"{path} does not hold torchao's flattened tensors (no tensor_names metadata).")


def load_dynamic_int8(folder: Union[str, os.PathLike], *, model_class: Any = None) -> nn.Module:
    """The model of a :func:`save_dynamic_int8` folder, in eval mode (its outputs equal the saved model's).

    ``model_class``: a transformers class (default: the one named in config.json's ``architectures``).
    CheckpointError for a folder of another format (float, QLoRA base, another library), a corrupt
    or missing weights file, or weights that load unquantized.
    """
    folder = os.fspath(folder)
    marker = read_marker(folder)
    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}.")
    _torchao()
    saved, here = str(marker.get("torchao")), torchao_version() or ""
    if saved.split(".")[:2] != here.split(".")[:2]:
        warnings.warn(f"{folder} was written with torchao {saved}; torchao {here} is installed.", PeftkitWarning,
                      stacklevel=2)
    _check_weights_file(os.path.join(folder, WEIGHTS_NAME))
    cls = _model_class(folder, model_class)
    try:
        model = cls.from_pretrained(folder)
    except Exception as exc:  # transformers, torchao and safetensors errors have no common base class
        raise CheckpointError(f"{folder} cannot be loaded: {type(exc).__name__}: {exc}") from None
    want = list(marker.get("quantized_modules") or [])
    got = _quantized_names(model)
    if sorted(got) != sorted(want):
        raise CheckpointError(f"{folder}: {len(got)} modules loaded int8, the folder lists {len(want)}; it was "
                              "changed after it was written.")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# timing (bench and `peftkit quantize`; never asserted in tests)


def latency(model: nn.Module, batch: Union[Mapping[str, torch.Tensor], torch.Tensor], *, repeats: int = 10,
            warmup: int = 2) -> float:
    """Median seconds of one forward pass of ``model`` on ``batch`` (a dict of model inputs, or input ids),
    under ``torch.inference_mode``, after ``warmup`` untimed passes."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}.")
    kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(**kwargs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
