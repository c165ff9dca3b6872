"""Hot-swapping a loaded LoRA adapter: another adapter's weights copied into its tensors, in place.

The swapped adapter keeps its name and its tensor objects; only their values change (``copy_``),
so a ``torch.compile``d model sees new weights without recompiling (the compiled graph reads the
parameters as inputs). What the graph would otherwise see change must be fixed beforehand, once,
by :func:`prepare_model_for_compiled_hotswap`, called after loading the first adapter and before
compiling:

* the scalings ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) become 0-dim tensors, changed
  in place by a swap (a Python number is a constant of the graph: a new value recompiles);
* with ``target_rank``, every adapter's ``A`` (r, in, ...) and ``B`` (out, r, ...) are zero-padded
  to rank ``target_rank``. The output is unchanged, as the padded rows of ``A`` and columns of
  ``B`` are zero: ``B' A' = [B 0] [A; 0] = B A``. A swapped-in adapter of a smaller rank is
  copied into the leading rows / columns, the rest zeroed.

A tensor of a larger rank than the model holds replaces the old tensor's storage (the shape
changes: a compiled model recompiles, so pad to the largest rank first). Tensors of the old adapter
that the new one lacks are zeroed (that layer's delta ``s B A`` becomes zero); a tensor of the new
adapter that fits no tensor of the model, a swap into a merged adapter, or configs that differ in
what the weights do not carry (:data:`CONFIG_KEYS_TO_CHECK`) raise :class:`~peftkit.errors.HotswapError`
before anything changes. Only LoRA adapters (Linear, Embedding, Conv layers) can be swapped, as in
Hugging Face PEFT (``peft.utils.hotswap``, whose names and messages these functions keep).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .checkpoint import PREFIX, adapter_entries, base_of, check_state_dict, load_peft_weights
from .config import PeftConfig
from .core.layer import AdapterLayer
from .errors import AdapterNameError, ConfigError, HotswapError
from .registry import lookup

# config fields that change the output but are not in the weights, per method
CONFIG_KEYS_TO_CHECK = {"LORA": ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")}
COMPILED_PREFIX = "_orig_mod."


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(module path relative to the user's model, layer) of every LoRA layer of ``model`` (a
    PeftModel, a compiled one, or a model with injected layers)."""
    root = unwrap_compiled(model)
    base = base_of(root)
    layer_types = lookup("LORA").layer_types
    for key, module in base.named_modules():
        if isinstance(module, layer_types):
            yield key, module


def _scaling(config: PeftConfig, key: str) -> tuple[int, float, float]:
    """(r, lora_alpha, s) of ``config`` for the module at ``key``."""
    r, alpha = config.rank_for(key), config.alpha_for(key)
    return r, alpha, alpha / math.sqrt(r) if config.use_rslora else alpha / r


def set_scaling(layer: AdapterLayer, name: str, value: float) -> None:
    """Adapter ``name``'s scaling in ``layer`` := ``value``: in place when it is a tensor."""
    current = layer.scaling[name]
    if isinstance(current, torch.Tensor):
        with torch.no_grad():
            current.fill_(value)
    else:
        layer.scaling[name] = float(value)


def rank_of(layer: AdapterLayer, name: str) -> int:
    """The rank adapter ``name``'s tensors have in ``layer`` (rows of A)."""
    a = layer.lora_A[name].weight if name in layer.lora_A else layer.lora_embedding_A[name]
    return a.shape[0]


# -- configs ----------------------------------------------------------------------------------


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """HotswapError unless an adapter of ``config1`` may be swapped into one of ``config0``: the same
    method, one that can be hot-swapped (LoRA), and equal fields the weights do not carry
    (:data:`CONFIG_KEYS_TO_CHECK`: rsLoRA, dropout, alpha pattern, DoRA). Ranks and ``lora_alpha``
    may differ: a swap sets the scalings from the new config."""
    for config in (config0, config1):
        if not isinstance(config, PeftConfig):
            raise ConfigError(f"Expected a PeftConfig, got {type(config).__name__}.")
    type0, type1 = str(config0.peft_type), str(config1.peft_type)
    if type0 != type1:
        raise HotswapError(f"Incompatible PEFT types found: {type0} and {type1}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        raise HotswapError(f"Hotswapping only supports {', '.join(CONFIG_KEYS_TO_CHECK)} but {type0} was passed.")
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        val0, val1 = getattr(config0, key, None), getattr(config1, key, None)
        if val0 != val1:
            raise HotswapError(f"Configs are incompatible: for {key}, {val0} != {val1}")


# -- preparing for compilation ----------------------------------------------------------------


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: Optional[int] = None,
                                       config: Optional[Union[PeftConfig, dict[str, PeftConfig]]] = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
    """Make later hot-swaps of a model that will be compiled not recompile it (module doc): the
    LoRA scalings become tensors and, with ``target_rank`` (the largest rank to be swapped in), every
    LoRA adapter is zero-padded to that rank. Call it after loading the first adapter, before
    ``torch.compile``. ``config`` (a LoraConfig or a dict of them, as ``peft_model.peft_config``):
    their ``r`` and ``rank_pattern`` values are set to ``target_rank``. ``check_compiled``: what to do
    if the model is compiled already ("error", "warn", "ignore"). All or nothing: every layer is
    checked before any is changed. The output is unchanged."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ConfigError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead.")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise HotswapError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.", stacklevel=2)
    layers = [layer for _, layer in lora_layers(model)]
    if not any(layer.r for layer in layers):
        raise HotswapError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                           "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1:
            raise ConfigError(f"target_rank must be a positive integer, got {target_rank!r}.")
        for layer in layers:
            check_padding(layer, target_rank)
    for layer in layers:
        for name, value in list(layer.scaling.items()):
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), device=layer.base_device())
        if target_rank is not None:
            for name in list(layer.r):
                pad_adapter(layer, name, target_rank)
        layer.clear_cache()
    if config and target_rank is not None:
        for lora_config in (config.values() if isinstance(config, Mapping) else [config]):
            lora_config.r = target_rank
            if lora_config.rank_pattern:
                lora_config.rank_pattern = {key: target_rank for key in lora_config.rank_pattern}


def _groups(layer: AdapterLayer) -> int:
    """The base convolution's groups (1 for other layers)."""
    return getattr(layer.get_base_layer(), "groups", 1) if hasattr(layer, "conv_fn") else 1


def check_padding(layer: AdapterLayer, target_rank: int) -> None:
    """HotswapError if an adapter of ``layer`` cannot be padded to ``target_rank``."""
    groups = _groups(layer)
    if target_rank % groups:
        raise HotswapError(f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {target_rank}, but "
                           f"the target rank is not divisible by {groups}. Please choose a target rank that is "
                           f"divisible by {groups}.")
    for name in layer.r:
        rank = rank_of(layer, name)
        if rank > target_rank:
            raise HotswapError(f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is "
                               f"larger ({rank}). This is not possible.")


def copy_rank_blocks(dest: torch.Tensor, src: torch.Tensor, groups: int) -> None:
    """Copy ``src`` into ``dest`` (zeroed first) along dim 0, group block by group block: a grouped
    convolution's ``B`` reads rank channels ``[j r/g, (j+1) r/g)`` for group ``j``, so each group's
    rows go to the start of its block of the larger rank."""
    dest.zero_()
    per_dest, per_src = dest.shape[0] // groups, src.shape[0] // groups
    for j in range(groups):
        dest[j * per_dest: j * per_dest + per_src].copy_(src[j * per_src:(j + 1) * per_src])


def _padded(old: torch.Tensor, shape: tuple[int, ...], groups: int, rank_dim0: bool) -> torch.Tensor:
    new = torch.zeros(shape, device=old.device, dtype=old.dtype)
    if rank_dim0 and groups > 1:
        copy_rank_blocks(new, old, groups)
    else:
        new[tuple(slice(0, n) for n in old.shape)] = old
    return new


def pad_adapter(layer: AdapterLayer, name: str, target_rank: int) -> None:
    """Zero-pad adapter ``name`` of ``layer`` to rank ``target_rank`` (new parameters, same
    ``requires_grad``); ``layer.r[name]`` becomes ``target_rank``. B A is unchanged."""
    if rank_of(layer, name) == target_rank:
        return
    groups = _groups(layer)
    with torch.no_grad():
        if name in layer.lora_embedding_A:
            for table, dim in ((layer.lora_embedding_A, 0), (layer.lora_embedding_B, 1)):
                old = table[name]
                shape = list(old.shape)
                shape[dim] = target_rank
                table[name] = nn.Parameter(_padded(old, tuple(shape), 1, dim == 0), requires_grad=old.requires_grad)
        else:
            a, b = layer.lora_A[name], layer.lora_B[name]
            shape_a = (target_rank, *a.weight.shape[1:])
            shape_b = (b.weight.shape[0], target_rank // groups, *b.weight.shape[2:])
            a.weight = nn.Parameter(_padded(a.weight, shape_a, groups, True), requires_grad=a.weight.requires_grad)
            b.weight = nn.Parameter(_padded(b.weight, shape_b, groups, False), requires_grad=b.weight.requires_grad)
            for module, attr in ((a, "out_features"), (a, "out_channels"), (b, "in_features"), (b, "in_channels")):
                if hasattr(module, attr):
                    setattr(module, attr, target_rank)
    layer.r[name] = target_rank


# -- swapping ---------------------------------------------------------------------------------


def _entry_index(root: nn.Module, adapter_name: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(any accepted key -> in-memory key, in-memory key -> tensor) of adapter ``adapter_name``'s
    tensors. Accepted: in-memory and file keys, with or without the PeftModel prefix."""
    alias: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for mem_key, file_key, tensor in adapter_entries(root, adapter_name):
        tensors[mem_key] = tensor
        for key in (mem_key, file_key):
            alias[key] = mem_key
            alias[key[len(PREFIX):] if key.startswith(PREFIX) else PREFIX + key] = mem_key
    return alias, tensors


def _fit(key: str, old: torch.Tensor, new: torch.Tensor) -> str:
    """How ``new`` goes into ``old``: "same" shape, "pad" (a smaller rank: into the leading slice,
    the rest zeroed) or "grow" (a larger rank: the storage replaced); HotswapError when they differ
    anywhere but in the rank dimension (dim 0 of ``A``, dim 1 of ``B``)."""
    if old.shape == new.shape:
        return "same"
    leaf = key.rsplit(".", 3)
    rank_dim = 0 if any(p in ("lora_A", "lora_embedding_A") for p in leaf) else (
        1 if any(p in ("lora_B", "lora_embedding_B") for p in leaf) else None)
    differ = [i for i in range(max(old.dim(), new.dim()))
              if old.dim() != new.dim() or old.shape[i] != new.shape[i]]
    if rank_dim is None or differ != [rank_dim]:
        raise HotswapError(f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs "
                           f"{tuple(new.shape)}; the adapters are for different models or layers. Nothing was swapped.")
    return "pad" if new.shape[rank_dim] < old.shape[rank_dim] else "grow"


def _plan(root: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str
          ) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor, str]], list[tuple[str, torch.Tensor]]]:
    """The checked swap: (key, old, new, fit) per given tensor and the (key, old) tensors to zero."""
    alias, tensors = _entry_index(root, adapter_name)
    if not tensors:
        raise HotswapError(f"The model has no adapter {adapter_name!r} to hot-swap; load one first "
                           "(PeftModel.from_pretrained) and swap others into it.")
    unexpected, plan = [], []
    for key, new in state_dict.items():
        mem_key = alias.get(key[len(COMPILED_PREFIX):] if key.startswith(COMPILED_PREFIX) else key)
        if mem_key is None:
            unexpected.append(key)
            continue
        if not new.is_floating_point():
            raise HotswapError(f"{key}: expected a floating point tensor, got {new.dtype}.")
        plan.append((mem_key, tensors[mem_key], new, _fit(mem_key, tensors[mem_key], new)))
    if unexpected:
        raise HotswapError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}. "
                           "The new adapter targets modules the loaded one does not; nothing was swapped.")
    given = {k for k, _, _, _ in plan}
    missing = [(k, t) for k, t in tensors.items() if k not in given]
    for key, _ in missing:
        if not any(part in key for part in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")):
            raise HotswapError(f"The new adapter has no tensor for {key}, which cannot be zeroed out (only LoRA A/B "
                               "tensors can); nothing was swapped.")
    return plan, missing


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig, parameter_prefix: str = "lora_") -> None:
    """Swap the weights of ``state_dict`` into the loaded LoRA adapter ``adapter_name`` (module doc).

    ``model``: a PeftModel, a compiled one, or a model with injected LoRA layers. Keys: in-memory
    (``…lin0.lora_A.default.weight``, Hugging Face PEFT's contract) or file keys (``…lin0.lora_A.weight``).
    ``config``: the new adapter's config; the scalings are set from its ``lora_alpha``, ``r`` and
    patterns. ``parameter_prefix`` is accepted for compatibility (the adapter's tensors are known
    structurally). Everything is checked first: on HotswapError nothing changed."""
    check_state_dict(state_dict, "hot-swapped state dict")
    root = unwrap_compiled(model)
    layers = list(lora_layers(root))
    merged = [key for key, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise HotswapError(f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base "
                           f"weights (e.g. {merged[0]}). Please unmerge the adapter first by calling "
                           "`peft_model.unmerge_adapter()`.")
    if not hasattr(config, "rank_for"):
        raise HotswapError(f"Hotswapping only supports LORA but {getattr(config, 'peft_type', type(config).__name__)} "
                           "was passed.")
    plan, missing = _plan(root, state_dict, adapter_name)
    with torch.no_grad():
        for _, old in missing:
            old.zero_()
        for _, old, new, fit in plan:
            new = new.to(device=old.device, dtype=old.dtype)
            if fit == "same":
                old.copy_(new)
            elif fit == "grow":  # the shape changes: a compiled model recompiles
                old.data = new.clone()
            else:
                old.zero_()
                old[tuple(slice(0, n) for n in new.shape)].copy_(new)
    for key, layer in layers:
        if adapter_name in layer.r:
            _regroup_conv_a(layer, adapter_name, plan)
            r, alpha, s = _scaling(config, key)
            layer.lora_alpha[adapter_name] = alpha
            layer.r[adapter_name] = rank_of(layer, adapter_name)
            set_scaling(layer, adapter_name, s)
            layer.clear_cache()


def _regroup_conv_a(layer: AdapterLayer, name: str, plan: list[tuple[str, torch.Tensor, torch.Tensor, str]]) -> None:
    """A grouped convolution's ``A`` padded by a swap: its rows moved into their group blocks."""
    groups = _groups(layer)
    if groups == 1 or name not in layer.lora_A:
        return
    weight = layer.lora_A[name].weight
    for _, old, new, fit in plan:
        if old is weight and fit == "pad" and new.shape[0] < old.shape[0]:
            with torch.no_grad():
                copy_rank_blocks(old, new.to(device=old.device, dtype=old.dtype), groups)


def in_memory_key(file_key: str, adapter_name: str) -> str:
    """A LoRA file key with the adapter name put in (``…lora_A.weight`` -> ``…lora_A.<name>.weight``,
    ``…lora_embedding_A`` -> ``…lora_embedding_A.<name>``), for keys that match no tensor."""
    head, _, last = file_key.rpartition(".")
    if last.startswith("lora_"):
        return f"{file_key}.{adapter_name}"
    if head.rpartition(".")[2].startswith("lora_"):
        return f"{head}.{adapter_name}.{last}"
    return file_key


def hotswap_adapter(model: nn.Module, model_name_or_path: Union[str, os.PathLike], adapter_name: str,
                    torch_device: Optional[str] = None, **kwargs: Any) -> None:
    """Replace the weights of the loaded LoRA adapter ``adapter_name`` of ``model`` (a PeftModel,
    possibly compiled) with those of the adapter folder or Hub repo ``model_name_or_path``; the name
    stays. The configs must be compatible (:func:`check_hotswap_configs_compatible`) and the new
    adapter may target no module the old one does not. ``torch_device``: where the file is read to
    (default: CPU; the tensors are then copied to where the model's are). ``kwargs``: ``subfolder``,
    ``revision`` and Hub arguments. On error nothing changed."""
    root = unwrap_compiled(model)
    configs = getattr(root, "peft_config", None)
    if not isinstance(configs, dict):
        raise HotswapError(f"hotswap_adapter needs a PeftModel, got {type(root).__name__}; for a model with injected "
                           "adapters use hotswap_adapter_from_state_dict.")
    if adapter_name not in configs:
        raise AdapterNameError(f"Unknown adapter {adapter_name!r}; loaded adapters: {list(configs)}.")
    subfolder, revision = kwargs.pop("subfolder", None), kwargs.pop("revision", None)
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder, revision=revision, **kwargs)
    check_hotswap_configs_compatible(configs[adapter_name], config)
    weights = load_peft_weights(model_name_or_path, device=torch_device, subfolder=subfolder, revision=revision,
                                **kwargs)
    alias, _ = _entry_index(root, adapter_name)
    state_dict = {alias.get(k, in_memory_key(k, adapter_name)): v for k, v in weights.items()}
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "lora_layers",
    "prepare_model_for_compiled_hotswap",
    "set_scaling",
]
