"""Adapter folders: safetensors + config with Hugging Face PEFT key naming, atomic writes, validation.

Layout (as Hugging Face PEFT 0.21)::

    dir/adapter_config.json
    dir/adapter_model.safetensors
    dir/README.md
    dir/<name>/...            # every adapter other than "default"

In memory keys carry the adapter name (``...q_proj.lora_A.default.weight``); file keys do not
(``base_model.model....q_proj.lora_A.weight``). Loading checks every tensor against the model before
touching it, and reads only safetensors (legacy ``.bin`` with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from ._io import load_tensors, make_folder, save_tensors, save_tensors_pickle
from .config import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftConfig
from .core.layer import AdapterLayer
from .core.names import check_plain_name
from .core.modules_to_save import ModulesToSaveWrapper
from .errors import CheckpointError, PeftkitWarning
from .hub import resolve_file
from .model_card import model_hub_name, write_model_card
from .registry import Method, method_for

PREFIX = "base_model.model."
# Module names whose weights ``save_embedding_layers="auto"`` saves when a LoRA config targets them
# (Hugging Face PEFT's list).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def load_peft_weights(model_id: str | os.PathLike, device: Optional[str] = None, subfolder: Optional[str] = None,
                      revision: Optional[str] = None, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (or Hub repo): safetensors first, then legacy ``.bin``."""
    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, revision=revision,
                        missing_ok=True, **hub_kwargs)
    if path is None:
        path = resolve_file(model_id, WEIGHTS_NAME, subfolder=subfolder, revision=revision, missing_ok=True,
                            **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(model_id), subfolder or "")
        raise CheckpointError(f"{where} has neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME}.")
    return load_tensors(path, device)


# ---------------------------------------------------------------------------------------------
# which tensors belong to an adapter


def adapter_entries(root: nn.Module, adapter_name: str, bias: str = "none",
                    prefix: str = "") -> Iterator[tuple[str, str, torch.Tensor]]:
    """(in-memory key, file key, tensor) of every tensor saved for ``adapter_name``.

    Selection is structural: each adapter layer lists its tensors; ``bias`` adds biases
    ("all": every bias of the model, "lora_only": the biases of adapted layers).
    """
    seen: set[int] = set()
    layers = []
    modules = dict(root.named_modules())
    for key, module in modules.items():
        if isinstance(module, AdapterLayer):
            layers.append((key, module))
            fkey = strip_stacks(key, module, modules)
            for local, tensor in module.adapter_param_items(adapter_name):
                seen.add(id(tensor))
                yield prefix + f"{key}.{local}", prefix + strip_wrappers(f"{fkey}.{module.file_key(local, adapter_name)}"), tensor
    if bias == "all":
        wrapped = {id(p) for _, m in layers if isinstance(m, ModulesToSaveWrapper) for p in m.parameters()}
        adapter_ids = {id(p) for _, m in layers for attr in m.adapter_layer_names for p in getattr(m, attr).parameters()}
        for key, p in root.named_parameters():
            if key.endswith("bias") and id(p) not in seen and id(p) not in wrapped and id(p) not in adapter_ids:
                yield prefix + key, prefix + strip_wrappers(key), p
    elif bias == "lora_only":
        for key, module in layers:
            if isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.adapter_names:
                continue
            b = getattr(module.get_base_layer(), "bias", None)
            if isinstance(b, nn.Parameter):
                yield prefix + f"{key}.base_layer.bias", prefix + strip_wrappers(f"{key}.base_layer.bias"), b


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: Union[bool, str] = "auto",
                              ) -> dict[str, torch.Tensor]:
    """The file-keyed tensors of ``adapter_name`` (Hugging Face name and signature).

    ``save_embedding_layers`` (PeftModels with LoRA-family adapters): ``True`` also saves the base
    model's input and output embedding weights; ``"auto"`` does so when the config targets
    ``embed_tokens`` / ``lm_head`` (the base weight under the adapter, ``….embed_tokens.base_layer.weight``)
    or when the model's ``vocab_size`` differs from the config of ``base_model_name_or_path`` (read
    from a local folder or the Hub cache, never downloaded): the vocabulary was resized, and the
    adapter is useless without the new rows. Hugging Face PEFT's rule and keys; a warning says when
    ``"auto"`` adds them."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if save_embedding_layers not in (True, False, "auto"):
        raise CheckpointError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}.")
    config = peft_config_of(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    if config is None:  # a plain module with injected adapters
        entries = list(adapter_entries(model, adapter_name, "none"))
    else:
        method = method_for(config)
        entries = list(adapter_entries(model, adapter_name, getattr(config, "bias", "none")))
        if method.extra_state is not None:
            out.update(method.extra_state.save(model, adapter_name))
        if method.is_layer_method:
            entries += [(k, k, t) for k, t in _embeddings_to_save(model, config, method, save_embedding_layers)]
    given = {strip_wrappers(k): v for k, v in state_dict.items()} if state_dict is not None else {}
    entries += list(buffer_entries(model, adapter_name))
    for mem_key, file_key, tensor in entries:  # an FSDP state dict names the tensors without the wrapper segments
        out[file_key] = given.get(strip_wrappers(mem_key), tensor)
    return out


def buffer_entries(root: nn.Module, adapter_name: str, prefix: str = "") -> Iterator[tuple[str, str, torch.Tensor]]:
    """(in-memory key, file key, buffer) of every saved buffer of ``adapter_name`` (running statistics
    of a BatchNorm in modules_to_save): saved, and loaded when a file has them."""
    modules = dict(root.named_modules())
    for key, module in modules.items():
        if isinstance(module, AdapterLayer):
            fkey = strip_stacks(key, module, modules)
            for local, buffer in module.adapter_buffer_items(adapter_name):
                yield (prefix + f"{key}.{local}", prefix + strip_wrappers(f"{fkey}.{module.file_key(local, adapter_name)}"),
                       buffer)


def peft_config_of(model: nn.Module, adapter_name: str) -> Optional[PeftConfig]:
    """The config of adapter ``adapter_name`` when ``model`` is a PeftModel (it has a ``peft_config``
    dict of peftkit configs), else None (a plain module with injected adapter layers). A PeftModel
    without that adapter: CheckpointError."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not all(isinstance(c, PeftConfig) for c in configs.values()):
        return None
    if adapter_name not in configs:
        raise CheckpointError(f"The model has no adapter {adapter_name!r}; its adapters: {list(configs)}.")
    return configs[adapter_name]


def base_of(model: nn.Module) -> nn.Module:
    """A PeftModel's base model; a model with injected adapters is its own base."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def _embeddings_targeted(model: nn.Module, config: PeftConfig) -> bool:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        names = [n for n, _ in base_of(model).named_modules() if n.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES]
        return any(re.fullmatch(targets, n) for n in names)
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module, config: PeftConfig) -> bool:
    """Whether the model's vocab_size differs from its base model's config.json (local or Hub cache)."""
    cfg = getattr(base_of(model), "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    source = config.base_model_name_or_path
    if not vocab or not source:
        return False
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # not a repo id, or no cache
            cached = None
        if not isinstance(cached, str):
            return False
        path = cached
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    base_vocab = data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))
    return isinstance(base_vocab, int) and base_vocab != vocab


def _embeddings_to_save(model: nn.Module, config: PeftConfig, method: Method, mode: Union[bool, str]
                        ) -> list[tuple[str, torch.Tensor]]:
    """The base embedding (key, tensor) pairs ``save_embedding_layers=mode`` adds to the file."""
    if mode is False or mode == "auto" and not method.saves_embedding_layers:
        return []
    targeted = _embeddings_targeted(model, config)
    if mode is True:
        if not hasattr(base_of(model), "get_input_embeddings"):
            warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model. "
                          "save_embedding_layers=True saves nothing more.", PeftkitWarning, stacklevel=4)
            return []
        return list(embedding_entries(model, wrapped_only=targeted))
    if targeted:
        why = "the adapter targets embed_tokens / lm_head"
    elif _vocab_resized(model, config):
        why = f"the vocabulary differs from {config.base_model_name_or_path}'s"
    else:
        return []
    entries = list(embedding_entries(model, wrapped_only=targeted))
    size = sum(t.numel() * t.element_size() for _, t in entries)
    warnings.warn(f"save_embedding_layers='auto': saving the base embedding weights ({size / 2**20:.1f} MiB) with the "
                  f"adapter because {why} (as Hugging Face PEFT). Pass save_embedding_layers=False to leave them out.",
                  PeftkitWarning, stacklevel=4)
    return entries


def embedding_entries(model: nn.Module, wrapped_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of the base model's input and output embedding weights in a PeftModel: under
    the wrapped base layer (``….embed_tokens.base_layer.weight``) when an adapter wraps them.
    ``wrapped_only`` (the embeddings are targeted): only those an adapter wraps, as Hugging Face PEFT."""
    base = base_of(model)
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(base, getter)() if hasattr(base, getter) else None
        except (AttributeError, NotImplementedError):
            layer = None
        if isinstance(layer, AdapterLayer):
            layer = layer.get_base_layer()
        elif wrapped_only:
            continue
        if isinstance(layer, nn.Module) and all(layer is not w for w in wanted):
            wanted.append(layer)
    seen: set[int] = set()
    for name, module in model.named_modules():
        if any(module is w for w in wanted):
            for key, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{name}.{key}", p


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def strip_stacks(key: str, layer: AdapterLayer, modules: dict[str, nn.Module]) -> str:
    """``key`` without the ``base_layer`` segments of other methods' adapter layers stacked around it
    (``v_proj.base_layer`` under an IA3 layer is LoRA's ``v_proj``), so an adapter's file keys are the
    same whether or not another method shares its modules."""
    parts = key.split(".")
    out: list[str] = []
    for i, part in enumerate(parts):
        if part == "base_layer" and i > 0:
            if layer.stacks_another_method(modules.get(".".join(parts[:i]))):
                continue
        out.append(part)
    return ".".join(out)


def strip_wrappers(key: str) -> str:
    """``key`` without the module-name segments that FSDP and activation-checkpoint wrappers insert, so
    that a state dict of the unwrapped model and one of the wrapped model name the same tensors."""
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _normalise(key: str) -> str:
    """A file key without the PeftModel prefix (``base_model.model.`` for layer methods, ``base_model.``
    for prompt models) and without FSDP wrapper segments, so that keys written with or without them match."""
    key = strip_wrappers(key)
    for prefix in (PREFIX, "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class IncompatibleKeys(NamedTuple):
    """What :func:`set_peft_model_state_dict` did not match (the shape of ``torch``'s load_state_dict
    result, which Hugging Face PEFT returns): adapter tensors the state dict lacked (in-memory names, with
    the adapter name) and state-dict keys that matched no adapter tensor."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False, *, source: str = "state dict",
                              strict: bool = True) -> IncompatibleKeys:
    """Copy file-keyed tensors into adapter ``adapter_name``; validate everything first.

    Raises :class:`CheckpointError` naming the offending key on a shape mismatch or a missing tensor
    (if ``strict``), before any tensor is copied; ``ignore_mismatched_sizes=True`` skips misshapen
    tensors instead (a warning names them). Returns :class:`IncompatibleKeys`: the tensors not loaded
    (``strict=False``) and the file keys that matched nothing (ignored, with a warning). State a method
    keeps outside its layers (a prompt encoder) is checked and loaded by the method's
    :class:`~peftkit.registry.ExtraState`, in the same all-or-nothing way. Adapter tensors still on the meta
    device (created with ``low_cpu_mem_usage``) are replaced by new parameters holding the loaded values
    on their layer's device (assigned, as ``load_state_dict(assign=True)``); every one of them must be in
    the state dict. Others are copied into in place.
    """
    check_state_dict(peft_model_state_dict, source)
    config = peft_config_of(model, adapter_name)
    method = method_for(config) if config is not None else None
    given = dict(peft_model_state_dict)
    commit_extra: Optional[Callable[[], None]] = None
    if method is not None and method.extra_state is not None:
        commit_extra = method.extra_state.load(model, adapter_name, given, source)  # takes its own keys
    bias = getattr(config, "bias", "none") if config is not None else "none"
    entries = list(adapter_entries(model, adapter_name, bias))
    expected = {_normalise(fk): (fk, t) for _, fk, t in entries}
    memory_keys = {_normalise(fk): mk for mk, fk, _ in entries}
    given = {_normalise(k): v for k, v in given.items()}
    # base embedding weights saved with save_embedding_layers, among the keys no adapter tensor takes:
    # loaded into the base model
    optional: dict[str, tuple[str, torch.Tensor]] = {}
    if method is not None and method.is_layer_method and set(given) - set(expected):
        optional = {key: (k, t) for k, t in embedding_entries(model) if (key := _normalise(k)) in given
                    and key not in expected}
        # base biases saved by an adapter with bias="all" / "lora_only" load into the model whatever this
        # adapter's bias setting (as Hugging Face PEFT's load_state_dict does)
        optional.update({key: (k, t) for k, t in model.named_parameters() if k.endswith("bias")
                         and (key := _normalise(k)) in given and key not in expected})
    # buffers of modules_to_save copies (BatchNorm statistics): loaded when the file has them (files
    # written before peftkit saved them do not)
    optional.update({key: (fk, t) for _, fk, t in buffer_entries(model, adapter_name)
                     if (key := _normalise(fk)) in given and key not in expected})
    expected.update(optional)
    unexpected = sorted(set(given) - set(expected))
    if expected and unexpected and len(unexpected) == len(given):
        raise CheckpointError(
            f"None of the {len(given)} tensors in {source} matches the model (e.g. {unexpected[0]!r}); the adapter was "
            f"saved for a different model or method. The model expects keys like {next(iter(expected))!r}."
        )
    if ignore_mismatched_sizes:
        skipped = [k for k, (_, t) in expected.items() if k in given and tuple(given[k].shape) != tuple(t.shape)]
        if skipped:
            warnings.warn(f"{source}: ignore_mismatched_sizes skips {len(skipped)} tensors whose shapes differ from the "
                          f"model's: {skipped[:5]}", PeftkitWarning, stacklevel=2)
        given = {k: v for k, v in given.items() if k not in skipped}
    _check_tensors(expected, given, set(optional), source, strict)
    if unexpected:
        warnings.warn(f"{source}: ignoring {len(unexpected)} tensors that match no adapter tensor: "
                      f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}", PeftkitWarning, stacklevel=3)
    on_meta = [fk for key, (fk, t) in expected.items() if t.is_meta and key not in given]
    if on_meta:
        raise CheckpointError(f"{source} has no tensor {on_meta[0]!r}, and the adapter was created on the meta device "
                              "(low_cpu_mem_usage=True), so every adapter tensor must be loaded.")
    assign: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, (_, tensor) in expected.items():
            if key in given and tensor.is_meta:
                assign[id(tensor)] = given[key]
            elif key in given:
                tensor.copy_(given[key].to(device=tensor.device, dtype=tensor.dtype))
        assign_meta_tensors(model, assign)
        if commit_extra is not None:
            commit_extra()
    for _, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            module.clear_cache()
    missing = [memory_keys[k] for k in expected if k in memory_keys and k not in given]
    return IncompatibleKeys(missing, unexpected)


def assign_meta_tensors(model: nn.Module, values: dict[int, torch.Tensor]) -> None:
    """Replace each meta parameter whose ``id`` is in ``values`` by a new parameter holding that value
    (its dtype and ``requires_grad`` kept) on the device of its adapter layer's base."""
    if not values:
        return
    for layer in [m for m in model.modules() if isinstance(m, AdapterLayer)]:
        device = layer.base_device()
        for module in layer.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_meta and id(p) in values:
                    data = torch.empty(p.shape, device=device, dtype=p.dtype).copy_(values[id(p)])
                    module._parameters[name] = nn.Parameter(data, requires_grad=p.requires_grad)


def check_state_dict(state_dict: Any, source: str = "state dict") -> None:
    """CheckpointError unless ``state_dict`` is a mapping of string keys to tensors (naming the first
    key that is not)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensor name -> torch.Tensor, got "
                              f"{type(state_dict).__name__}.")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {key!r} is a {type(key).__name__}, not a string; keys are tensor names "
                                  "as written by get_peft_model_state_dict.")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key!r} is a {type(value).__name__}, not a torch.Tensor; pass the tensors "
                                  "of an adapter (get_peft_model_state_dict / load_peft_weights).")


def _check_tensors(expected: dict[str, tuple[str, torch.Tensor]], given: dict[str, torch.Tensor], optional: set[str],
                   source: str, strict: bool) -> None:
    """CheckpointError for the first missing (if ``strict``), misshapen or non-float tensor."""
    for key, (file_key, tensor) in expected.items():
        if key not in given:
            if strict:
                raise CheckpointError(f"{source} has no tensor {file_key!r}; the file is incomplete or for another model.")
            continue
        if tuple(given[key].shape) != tuple(tensor.shape):
            why = (f"the adapter was trained with a resized vocabulary. Call model.resize_token_embeddings("
                   f"{given[key].shape[0]}) before loading it" if key in optional
                   else "the adapter does not fit this model (different base model, r or targets)")
            raise CheckpointError(f"{source}: tensor {file_key!r} has shape {tuple(given[key].shape)} but the model "
                                  f"expects {tuple(tensor.shape)}; {why}.")
        if given[key].is_floating_point() != tensor.is_floating_point() or given[key].is_complex():
            raise CheckpointError(f"{source}: tensor {file_key!r} has dtype {given[key].dtype}, expected "
                                  f"{'floating point' if tensor.is_floating_point() else tensor.dtype}.")


# ---------------------------------------------------------------------------------------------
# folders


def save_adapter_folder(folder: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                        safe_serialization: bool = True, extra_files: Optional[dict[str, dict]] = None,
                        config_overrides: Optional[dict] = None) -> None:
    """Write one adapter: weights first, then the config, each atomically."""
    make_folder(folder)
    if safe_serialization:
        save_tensors(tensors, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
    else:
        save_tensors_pickle(tensors, os.path.join(folder, WEIGHTS_NAME))
    for filename, extra in (extra_files or {}).items():
        save_tensors(extra, os.path.join(folder, filename))
    config.save_pretrained(folder, inference_mode=True, **(config_overrides or {}))


def save_adapters(model: nn.Module, save_directory: str | os.PathLike, names: list[str], *,
                  safe_serialization: bool = True, save_embedding_layers: Union[bool, str] = "auto",
                  is_main_process: bool = True) -> None:
    """``PeftModel.save_pretrained``: adapters ``names`` of ``model`` as Hugging Face PEFT folders
    ("default" at the top level, the others in sub-folders named after them, so every name must be
    plain: never a path) and one model card. Everything is checked before the first write."""
    save_directory = os.fspath(save_directory)
    for name in names:
        check_plain_name(name)
    folders = {name: save_directory if name == "default" else os.path.join(save_directory, name) for name in names}
    for folder in [save_directory, *folders.values()]:
        if os.path.isfile(folder):
            raise CheckpointError(f"{folder} is a file; save_pretrained needs a directory (the adapters other than "
                                  "'default' go into sub-folders named after them).")
    if not is_main_process:
        return
    make_folder(save_directory)
    for name in names:
        config = model.peft_config[name]
        tensors = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=save_embedding_layers)
        overrides = {}
        if config.task_type is None:
            base = model.get_base_model()
            overrides["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
        extra_state = method_for(config).extra_state
        extra_files = extra_state.files(model, name) if extra_state is not None and extra_state.files else {}
        save_adapter_folder(folders[name], config, tensors, safe_serialization=safe_serialization,
                            extra_files=extra_files, config_overrides=overrides)
    if names:  # one model card, at the top (as Hugging Face PEFT)
        first = model.peft_config[names[0]]
        write_model_card(save_directory, model_hub_name(model), str(first.peft_type),
                         str(first.task_type) if first.task_type else None, first.to_dict())
