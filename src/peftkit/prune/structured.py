"""Structured pruning: whole attention heads and whole MLP channels removed physically.

:func:`structured_prune` removes the same number of attention units and MLP channels from every
layer of a Llama-style, GPT-2 or BERT model, choosing per layer the least important ones, and
shrinks the weight tensors: the pruned model is smaller and faster, not a dense model with zeros.
Its outputs equal those of the dense model with the same heads and channels masked (their columns
of the attention output projection and of the MLP down projection zeroed), because a removed head
or channel contributes nothing else: heads are independent until the output projection, and an
MLP channel ``j`` adds ``act(x·g_j)·(x·u_j)·D[:, j]`` (``gate``/``up`` rows, ``down`` column) or
``act(x·W1_j + b_j)·W2[:, j]`` and nothing more.

Units and how many are removed (:mod:`peftkit.prune.architectures` has where they live):

- attention: ``round(heads · H)`` of the ``H`` query heads of a layer. With grouped-query attention
  (Llama, ``r = num_attention_heads / num_key_value_heads > 1``) heads go in whole KV groups (a KV head
  with its ``r`` query heads), so ``round(heads · H)`` must be a multiple of ``r`` (ConfigError
  otherwise) and the ratio ``r`` is kept;
- MLP: ``round(channels · I)`` of the ``I`` intermediate channels.

Importance of a unit ``U`` whose weight blocks are ``W_s`` (rows of q/k/v and columns of o for a
head; rows of gate/up and the column of down for a channel; rows of ``c_attn``/``c_fc`` and
columns/rows of ``c_proj`` for GPT-2):

- ``"l1"``: ``S(U) = Σ_s Σ_{i,j ∈ U} |W_s[i, j]|``;
- ``"wanda"``: ``S(U) = Σ_s Σ_{i,j ∈ U} |W_s[i, j]| · ‖X_s[:, j]‖₂``, where ``X_s`` stacks the inputs
  of the module of ``W_s`` over every token of the calibration batches, padding left out (Wanda's score,
  Sun et al. 2023, summed over the unit; the norms of :mod:`peftkit.prune.calibration`).

The units with the smallest ``S`` are removed (ties: the lower index goes first).

:func:`save_structured` writes a transformers folder (``save_pretrained``) plus ``structure.json``
(which original units every layer kept); :func:`load_structured` rebuilds the model. The config is
updated where transformers can express the result, and then the folder also loads with plain
``AutoModel*.from_pretrained``: MLP channels always (``intermediate_size``, GPT-2's ``n_inner``);
Llama's heads when ``hidden_size`` stays a multiple of the new ``num_attention_heads`` (``LlamaConfig``
requires it even with an explicit ``head_dim``, which is written). GPT-2 and BERT derive the head size
from the hidden size and the head count, so their pruned heads never are. Where the config cannot say
it, the config keeps the original head counts (the attention modules carry the new ones) and plain
``from_pretrained`` refuses the folder (the weights have other shapes): use :func:`load_structured`.
:attr:`StructuredResult.config_describes_model` says which case a model is in. In that case, code that
sizes buffers from the config (a static KV cache) does not fit the model; the default dynamic cache
does.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .._io import atomic_write_bytes, load_tensors, make_folder
from ..errors import CheckpointError, ConfigError
from .architectures import Architecture, UnitSpec, architecture_for, conv1d_class, shrink_layer, weight_dim
from .calibration import target_input_norms

IMPORTANCE = ("l1", "wanda")
STRUCTURE_FILE = "structure.json"
STRUCTURE_FORMAT = "peftkit-structured"
STRUCTURE_VERSION = 1

Calibration = Union[torch.Tensor, dict, Iterable]


@dataclass
class StructuredResult:
    """What :func:`structured_prune` removed. Indices refer to the layer as it was before the call;
    ``*_removed`` lists hold one sorted list per layer; the pairs are (before, after) per layer."""

    architecture: str
    importance: str
    heads_removed: list[list[int]]  # query heads
    kv_heads_removed: list[list[int]]  # KV heads (equal to heads_removed without grouped-query attention)
    channels_removed: list[list[int]]
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    channels: tuple[int, int]
    params: tuple[int, int]
    config_describes_model: bool  # the config builds these shapes: a saved folder loads with plain from_pretrained
    structure: dict = field(repr=False, default_factory=dict)  # the record structure.json holds

    @property
    def param_reduction(self) -> float:
        """The fraction of the model's parameters removed."""
        return 1.0 - self.params[1] / self.params[0]

    def summary(self) -> str:
        """One line: heads, channels and parameters before -> after."""
        return (f"{self.architecture}: heads {self.heads[0]} -> {self.heads[1]} (KV {self.kv_heads[0]} -> "
                f"{self.kv_heads[1]}), MLP channels {self.channels[0]} -> {self.channels[1]} per layer; "
                f"parameters {self.params[0]:,} -> {self.params[1]:,} (-{100 * self.param_reduction:.1f}%)")


# ---------------------------------------------------------------------------------------------
# checks (all of them run before the model changes)


def _architecture(model: nn.Module) -> Architecture:
    """The model's architecture, with its variant and module types checked (ConfigError otherwise)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        hint = " (for a PeftModel, merge_and_unload() first)" if hasattr(model, "peft_config") else ""
        raise ConfigError(f"structured_prune needs a transformers model (Llama, GPT-2 or BERT), got "
                          f"{type(model).__name__}{hint}.")
    arch = architecture_for(getattr(model.config, "model_type", None))
    arch.check_config(model.config)
    return arch


def _check_modules(model: nn.Module, specs: list[UnitSpec], layers: list[nn.Module]) -> None:
    """Every module a spec names must be a plain ``nn.Linear`` / ``Conv1D`` with a real weight."""
    names = {id(m): n for n, m in model.named_modules()}
    plain = (nn.Linear, conv1d_class())
    for layer, spec in zip(layers, specs):
        for s in spec.slices:
            module = layer.get_submodule(s.path)
            where = f"{names.get(id(layer), '')}.{s.path}"
            if type(module) not in plain:
                raise ConfigError(f"{where} is a {type(module).__name__}, not a plain linear layer: structured "
                                  "pruning needs the dense model (merge_and_unload() adapters, "
                                  "dequantize_model() quantized weights) first.")
            if module.weight.device.type == "meta":
                raise ConfigError(f"{where} has no weights (meta device); load the model's weights first.")


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a fraction in [0, 1), got {value!r}.")
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be a fraction in [0, 1) of the units of every layer, got {value!r}.")
    return float(value)


def _units_to_remove(what: str, fraction: float, spec: UnitSpec) -> int:
    """How many units of ``spec`` a fraction removes per layer (ConfigError: all of them, or not a
    whole number of KV groups)."""
    total = spec.count * spec.heads_per_unit
    n = int(math.floor(fraction * total + 0.5))
    r = spec.heads_per_unit
    if n % r:
        step = r / total
        lower, upper = (n // r) * step, min((n // r + 1) * step, 1.0)
        raise ConfigError(f"{what}={fraction} removes {n} of the {total} query heads of a layer, but grouped-query "
                          f"attention removes whole KV groups of {r} query heads; use a multiple of {step:g} "
                          f"(e.g. {lower:g} or {upper:g}).")
    if n >= total:
        raise ConfigError(f"{what}={fraction} removes all {total} {'heads' if what == 'heads' else 'channels'} of a "
                          "layer; use a smaller fraction.")
    return n // r


def _layer_specs(arch: Architecture, layers: list[nn.Module], config: Any, kind: str) -> list[UnitSpec]:
    """The unit spec of every layer (ConfigError when layers differ in size: a config cannot say that)."""
    specs = [(arch.heads if kind == "heads" else arch.channels)(layer, config) for layer in layers]
    counts = sorted({s.count for s in specs})
    if len(counts) > 1:
        raise ConfigError(f"the layers of this model have different numbers of {kind} ({counts}); structured "
                          "pruning keeps them equal, so it needs a model whose layers all have the same size.")
    return specs


def forward_batches(calibration: Any) -> list[dict[str, Any]]:
    """The calibration data as a list of forward keyword arguments. Accepts a LongTensor of token
    ids (``[batch, seq]`` or ``[seq]``), a dict of forward arguments, or an iterable of either."""
    if calibration is None:
        raise ConfigError("importance='wanda' needs calibration data: token ids (a LongTensor [batch, seq]), a dict "
                          "of forward arguments, or a list of them.")
    if isinstance(calibration, (torch.Tensor, dict)):
        items = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ConfigError(f"calibration must be token ids, a dict of forward arguments or a list of them, got "
                          f"{type(calibration).__name__}.")
    else:
        items = list(calibration)
    if not items:
        raise ConfigError("calibration is empty; give at least one batch of token ids.")
    batches = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() or item.is_complex() or item.dtype == torch.bool or item.dim() not in (1, 2):
                raise ConfigError(f"calibration batch {i}: token ids must be an integer tensor [batch, seq] or "
                                  f"[seq], got dtype {item.dtype} with shape {tuple(item.shape)}.")
            item = {"input_ids": item if item.dim() == 2 else item[None]}
        if not isinstance(item, dict) or not ({"input_ids", "inputs_embeds"} & set(item)):
            raise ConfigError(f"calibration batch {i} must be token ids or a dict with input_ids or inputs_embeds.")
        first = item.get("input_ids", item.get("inputs_embeds"))
        if not isinstance(first, torch.Tensor) or first.numel() == 0:
            raise ConfigError(f"calibration batch {i} has no tokens.")
        batches.append(item)
    return batches


# ---------------------------------------------------------------------------------------------
# importance


def _input_norms(model: nn.Module, modules: list[nn.Module],
                 batches: list[dict[str, Any]]) -> dict[nn.Module, torch.Tensor]:
    """``‖X[:, j]‖₂`` for every input feature ``j`` of each module over the calibration tokens (padding left
    out): Wanda's norms of :func:`peftkit.prune.calibration.target_input_norms`, keyed by module."""
    name_of = {module: name for name, module in model.named_modules()}
    targets = {name_of[module]: module for module in dict.fromkeys(modules)}
    return {targets[name]: norm for name, norm in target_input_norms(model, targets, batches).items()}


def unit_scores(layer: nn.Module, spec: UnitSpec,
                norms: Optional[dict[nn.Module, torch.Tensor]] = None) -> torch.Tensor:
    """``S(U)`` of every unit of ``spec`` in ``layer`` (float64): the sum of ``|W|`` over the unit's
    blocks, each weight element scaled by its input feature's norm when ``norms`` is given (Wanda)."""
    total = torch.zeros(spec.count, dtype=torch.float64)
    for s in spec.slices:
        module = layer.get_submodule(s.path)
        w = module.weight.detach().abs().double()
        in_dim = weight_dim(module, "in")
        if norms is not None:
            n = norms[module].to(w.device, torch.float64)
            w = w * (n[None, :] if in_dim == 1 else n[:, None])
        dim = weight_dim(module, s.axis)
        per_index = w.sum(dim=1 - dim)
        total += per_index[s.offset:s.offset + spec.count * s.block].reshape(spec.count, s.block).sum(1).cpu()
    return total


def _removed(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` lowest-scoring units (stable: ties remove the lower index), sorted."""
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


# ---------------------------------------------------------------------------------------------
# the record of what a model kept


def structure_of(model: nn.Module) -> dict:
    """The model's structure record (``model.peftkit_structure``), or one saying nothing was removed."""
    record = getattr(model, "peftkit_structure", None)
    if record is not None:
        return record
    arch = _architecture(model)
    layers = arch.layers(model)
    heads = [arch.heads(layer, model.config) for layer in layers]
    channels = [arch.channels(layer, model.config) for layer in layers]
    return {"format": STRUCTURE_FORMAT, "version": STRUCTURE_VERSION, "architecture": arch.name,
            "model_class": type(model).__name__,
            "original": {"heads": heads[0].count, "channels": channels[0].count,
                         "heads_per_unit": heads[0].heads_per_unit},
            "layers": [{"heads_kept": list(range(h.count)), "channels_kept": list(range(c.count))}
                       for h, c in zip(heads, channels)]}


def _compose(record: dict, kind: str, keeps: list[list[int]]) -> None:
    """Update ``record`` after each layer kept the units ``keeps[i]`` of its current ones."""
    for entry, keep in zip(record["layers"], keeps):
        entry[f"{kind}_kept"] = [entry[f"{kind}_kept"][k] for k in keep]


def config_describes_model(model: nn.Module) -> bool:
    """Whether the model's config builds the model's current per-layer sizes, so that a folder it is
    saved to loads with plain ``from_pretrained`` (False: :func:`load_structured` is needed)."""
    arch = _architecture(model)
    sizes = arch.original_sizes(model.config)
    return all(arch.heads(layer, model.config).count == sizes["heads"] and
               arch.channels(layer, model.config).count == sizes["channels"] for layer in arch.layers(model))


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# pruning


def structured_prune(model: nn.Module, heads: float = 0.3, channels: float = 0.3, *, importance: str = "l1",
                     calibration: Optional[Calibration] = None) -> StructuredResult:
    """Remove whole attention heads and MLP channels from every layer of ``model``, in place.

    Args:
        model: a transformers Llama-style (``model_type="llama"``), GPT-2 or BERT model (any head class).
        heads: the fraction in [0, 1) of each layer's query heads to remove (whole KV groups with
            grouped-query attention, see the module docstring).
        channels: the fraction in [0, 1) of each layer's MLP intermediate channels to remove.
        importance: ``"l1"`` (weight magnitudes) or ``"wanda"`` (magnitudes times input norms over
            ``calibration``).
        calibration: for ``"wanda"``: token ids ``[batch, seq]``, a dict of forward arguments, or a
            list of either.

    Returns a :class:`StructuredResult`. The model's config is updated where it can say the new
    sizes, the attention modules' attributes everywhere; ``model.peftkit_structure`` records which
    original units every layer kept (what :func:`save_structured` writes). Bad input raises a
    ConfigError before anything changes.
    """
    arch = _architecture(model)
    heads, channels = _fraction("heads", heads), _fraction("channels", channels)
    if importance not in IMPORTANCE:
        raise ConfigError(f"importance must be one of {list(IMPORTANCE)}, got {importance!r}.")
    if importance == "l1" and calibration is not None:
        raise ConfigError("calibration data is used by importance='wanda' only; drop it or pass importance='wanda'.")
    batches = forward_batches(calibration) if importance == "wanda" else None
    config, layers = model.config, arch.layers(model)
    head_specs = _layer_specs(arch, layers, config, "heads")
    channel_specs = _layer_specs(arch, layers, config, "channels")
    _check_modules(model, head_specs + channel_specs, layers + layers)
    n_heads = _units_to_remove("heads", heads, head_specs[0])
    n_channels = _units_to_remove("channels", channels, channel_specs[0])
    record = structure_of(model)
    params_before = _param_count(model)

    norms = None
    if batches is not None:
        modules = [layer.get_submodule(s.path) for layer, h, c in zip(layers, head_specs, channel_specs)
                   for spec, n in ((h, n_heads), (c, n_channels)) if n for s in spec.slices]
        norms = _input_norms(model, modules, batches) if modules else {}
    head_removed = [_removed(unit_scores(layer, spec, norms), n_heads) if n_heads else []
                    for layer, spec in zip(layers, head_specs)]
    channel_removed = [_removed(unit_scores(layer, spec, norms), n_channels) if n_channels else []
                       for layer, spec in zip(layers, channel_specs)]

    record = json.loads(json.dumps(record))  # a copy: the model's record changes only at the end
    head_keeps = _apply(arch, layers, head_specs, head_removed, "heads", config)
    channel_keeps = _apply(arch, layers, channel_specs, channel_removed, "channels", config)
    arch.update_config(config, head_specs[0].count - n_heads if n_heads else None,
                       channel_specs[0].count - n_channels if n_channels else None)
    _compose(record, "heads", head_keeps)
    _compose(record, "channels", channel_keeps)
    model.peftkit_structure = record
    r, h0, c0 = head_specs[0].heads_per_unit, head_specs[0].count, channel_specs[0].count
    return StructuredResult(
        architecture=arch.name, importance=importance,
        heads_removed=[[u * r + k for u in units for k in range(r)] for units in head_removed],
        kv_heads_removed=head_removed, channels_removed=channel_removed,
        heads=(h0 * r, (h0 - n_heads) * r), kv_heads=(h0, h0 - n_heads), channels=(c0, c0 - n_channels),
        params=(params_before, _param_count(model)), config_describes_model=config_describes_model(model),
        structure=record)


def _apply(arch: Architecture, layers: list[nn.Module], specs: list[UnitSpec], removed: list[list[int]],
           kind: str, config: Any) -> list[list[int]]:
    """Shrink every layer to the units it keeps; returns the kept units per layer."""
    keeps = []
    for layer, spec, gone in zip(layers, specs, removed):
        keep = [u for u in range(spec.count) if u not in set(gone)]
        keeps.append(keep)
        if not gone:
            continue
        shrink_layer(layer, spec, keep)
        if kind == "heads":
            arch.set_heads(layer, len(keep), config)
        else:
            arch.set_channels(layer, len(keep))
    return keeps


# ---------------------------------------------------------------------------------------------
# saving and loading


def save_structured(model: nn.Module, folder: Union[str, os.PathLike], **save_kwargs: Any) -> None:
    """Write ``model`` as a transformers folder (``save_pretrained(folder, **save_kwargs)``) plus
    ``structure.json``, the record of which original heads and channels every layer kept, written
    last (atomically), so a folder :func:`load_structured` accepts is complete."""
    record = dict(structure_of(model), config_describes_model=config_describes_model(model))
    folder = os.fspath(folder)
    make_folder(folder)
    model.save_pretrained(folder, **save_kwargs)
    atomic_write_bytes(os.path.join(folder, STRUCTURE_FILE), json.dumps(record, indent=1).encode("utf-8"))


def _read_structure(folder: str) -> dict:
    """structure.json of ``folder``, its fields checked (CheckpointError otherwise)."""
    path = os.path.join(folder, STRUCTURE_FILE)
    if not os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(path):
        raise CheckpointError(f"{folder} is not a folder written by save_structured (config.json and "
                              f"{STRUCTURE_FILE} are needed).")
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        ok = record["format"] == STRUCTURE_FORMAT and isinstance(record["layers"], list) and \
            all(isinstance(record["original"][k], int) for k in ("heads", "channels", "heads_per_unit"))
        for entry in record["layers"]:
            for kind in ("heads", "channels"):
                kept = entry[f"{kind}_kept"]
                ok = ok and isinstance(kept, list) and len(kept) > 0 and kept == sorted(set(kept)) and \
                    all(isinstance(k, int) and 0 <= k < record["original"][kind] for k in kept)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}).") from None
    if not ok:
        raise CheckpointError(f"{path} is corrupt: it is not a {STRUCTURE_FORMAT} record with sorted kept units "
                              "per layer.")
    if record.get("version", 0) > STRUCTURE_VERSION:
        raise CheckpointError(f"{path} has version {record['version']}; this peftkit reads up to "
                              f"{STRUCTURE_VERSION}. Upgrade peftkit.")
    return record


def _model_class(record: dict, model_class: Any, folder: str) -> Any:
    """The class to build: ``model_class`` or the transformers class the record names (no code runs)."""
    import transformers
    from transformers import PreTrainedModel

    if model_class is not None:
        if not hasattr(model_class, "from_config"):
            raise ConfigError(f"model_class must be a transformers model class or Auto class, got {model_class!r}.")
        return model_class
    cls = getattr(transformers, str(record.get("model_class")), None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CheckpointError(f"{folder}: {record.get('model_class')!r} is not a transformers model class; pass "
                              "model_class=.")
    return cls


def _shrink_to_record(model: nn.Module, arch: Architecture, record: dict, folder: str) -> None:
    """Shrink a freshly built model to the units ``record`` says every layer kept (a layer already at
    that size, because the config says so, is left alone)."""
    layers, config = arch.layers(model), model.config
    if len(layers) != len(record["layers"]):
        raise CheckpointError(f"{folder}: {STRUCTURE_FILE} describes {len(record['layers'])} layers, the config "
                              f"{len(layers)}.")
    for layer, entry in zip(layers, record["layers"]):
        for kind in ("heads", "channels"):
            spec = (arch.heads if kind == "heads" else arch.channels)(layer, config)
            kept = entry[f"{kind}_kept"]
            if spec.count == len(kept):
                continue
            if spec.count != record["original"][kind]:
                raise CheckpointError(f"{folder}: the config builds layers with {spec.count} {kind} units, "
                                      f"{STRUCTURE_FILE} says {record['original'][kind]} before pruning.")
            shrink_layer(layer, spec, kept)
            if kind == "heads":
                arch.set_heads(layer, len(kept), config)
            else:
                arch.set_channels(layer, len(kept))


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a transformers folder: model.safetensors or the shards of its index."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    try:
        with open(index, encoding="utf-8") as fh:
            shards = json.load(fh)["weight_map"].values()
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no model.safetensors (nor a sharded index).") from None
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{index} is corrupt ({type(exc).__name__}: {exc}).") from None
    return [os.path.join(folder, f) for f in dict.fromkeys(shards)]


def _load_weights(model: nn.Module, folder: str) -> None:
    """Assign every tensor of the folder's safetensors file(s) to the parameter or buffer of that name
    (shapes checked), tie the weights and check that every parameter got a tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    loaded: set[int] = set()
    for path in weight_files(folder):
        for name, tensor in load_tensors(path).items():
            target = params.get(name, buffers.get(name))
            if target is None:
                raise CheckpointError(f"{path}: {name} is not a tensor of {type(model).__name__} (the folder belongs "
                                      "to another model).")
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the pruned model expects "
                                      f"{tuple(target.shape)}; {STRUCTURE_FILE} does not match the weights.")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if name in params:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=target.requires_grad)
                loaded.add(id(module._parameters[attr]))
            else:
                module._buffers[attr] = tensor
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in loaded]
    if missing:
        raise CheckpointError(f"{folder}: the weights have no tensor for {len(missing)} parameters (e.g. "
                              f"{missing[:3]}).")


def load_structured(folder: Union[str, os.PathLike], model_class: Any = None) -> nn.Module:
    """Load a folder written by :func:`save_structured`: build the model from its config with
    uninitialized parameters, shrink every layer to the heads and channels ``structure.json``
    says it kept, then read the weights (safetensors). Returns the model in eval mode, equal to the
    one saved, with ``peftkit_structure`` set.

    Args:
        folder: the folder.
        model_class: the transformers class to build (default: the class that was saved).
    """
    from transformers import AutoConfig

    folder = os.fspath(folder)
    record = _read_structure(folder)
    config = AutoConfig.from_pretrained(folder)
    try:
        arch = architecture_for(getattr(config, "model_type", None))
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    if arch.name != record.get("architecture"):
        raise CheckpointError(f"{folder}: {STRUCTURE_FILE} is for {record.get('architecture')!r}, the config for "
                              f"{arch.name!r}.")
    cls = _model_class(record, model_class, folder)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # empty parameters (every one is read below); computed buffers keep their values
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    _shrink_to_record(model, arch, record, folder)
    _load_weights(model, folder)
    model.eval()
    if os.path.isfile(os.path.join(folder, "generation_config.json")) and \
            getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    record.pop("config_describes_model", None)
    model.peftkit_structure = record
    return model
