"""Selective fine-tuning: BitFit (biases only) and partial fine-tuning (whole blocks or named modules).

Neither method adds new kinds of weights: each trains a subset of the model's own tensors. To keep
what every peftkit method has (several named adapters, ``disable_adapter``, merging, saving only the
tuned tensors), the tuned tensors are per-adapter **copies** held by a wrapper layer; the original
module stays frozen as ``base_layer``.

**BitFit** (Ben Zaken et al. 2022). :class:`BitFitLayer` wraps a module with a bias ``b0`` and holds
one bias ``b_a`` per adapter (``bitfit_bias[a]``, initialised to ``b0``: a no-op start)::

    y = f(x; W, b_eff),     b_eff = b0 + Σ_{a active} (b_a − b0)      (one active adapter: b_eff = b_a)

computed exactly by calling the base module with ``b_eff`` in place of its bias
(``torch.func.functional_call``), so any module with a ``bias`` parameter works. A mixed batch adds
the gathered per-row ``b_a − b0`` along the module's channel axis to the base output. Merging writes
``b_eff`` into the base bias (the original is kept for an exact unmerge). Targets: every module with a
bias parameter, or those matching ``target_modules``. File keys are the model's own bias keys
(``base_model.model.<module>.bias``).

**Partial fine-tuning.** :class:`PartialLayer` wraps a block (the last ``num_last_layers`` transformer
blocks, and/or modules named by ``target_modules``) and holds one trainable deep copy per adapter
(``partial_layers[a]``); the forward runs the active adapter's copy. File keys are the model's own
keys of the copied tensors (``base_model.model.model.layers.1.mlp.down_proj.weight``), so a saved
adapter is a subset of a full state dict. Only parameters are saved (not buffers such as BatchNorm
running statistics). Merging copies the tuned tensors into the original block (kept for an exact
unmerge); one adapter at a time, since copies replace rather than add.

:class:`CopyLayer` is the shared "one trainable copy per adapter" layer (also used by LayerNorm
tuning, :mod:`peftkit.methods.ln_tuning`). Its mixed-batch forward runs each distinct adapter's copy
on that adapter's rows (an index_select per distinct adapter, not per row); modules called with
extra arguments (whole transformer blocks with masks and caches) cannot be split by rows and raise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import PeftConfig, PeftType, positive_int, register_config
from ..errors import ConfigError, MergeError, PeftkitError, TargetError
from ..inject import (
    DEFAULT_LAYERS_PATTERN,
    AdapterLayer,
    MixedBatch,
    ModulesToSaveWrapper,
    _matches_list,
    _outer_modules,
    closest_module_names,
    run_rows_by_slot,
    excluded,
    in_modules_to_save,
)
from . import Method, register_method


def _as_list(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _outermost(keys: list[str]) -> list[str]:
    """Drop duplicates and keys nested inside another key (a wrapped module cannot be wrapped again inside)."""
    out: list[str] = []
    for key in sorted(dict.fromkeys(keys), key=lambda k: (k.count("."), k)):
        if not any(key.startswith(k + ".") for k in out):
            out.append(key)
    order = {k: i for i, k in enumerate(keys)}
    return sorted(out, key=lambda k: order[k])


def _no_match(model: nn.Module, what: str, targets: Any) -> str:
    hints = closest_module_names(model, targets)
    msg = f"No module of the model matched {what}={targets!r}."
    if hints:
        msg += f" Closest module names: {', '.join(hints)}."
    return msg


# ---------------------------------------------------------------------------------------------
# one trainable copy per adapter


class CopyLayer(AdapterLayer):
    """A module tuned in full: adapter ``a`` is a trainable deep copy ``<adapter_layer_names[0]>[a]`` of
    the base (subclasses name that ModuleDict, which is also its key prefix in files).

    Forward: disabled or no active adapter -> ``base(x)``; one active adapter -> ``copy_a(x)``;
    several active adapters -> error (copies replace the module, they do not add up). Merge copies the
    adapter's tensors into the base module (the originals are kept until unmerge).
    """

    strip_copy_prefix = False  # file keys: the module's own names (True) or "<copies name>.<param>" (False)
    method_name = "copy"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self._stash: Optional[dict[str, torch.Tensor]] = None

    @property
    def copies(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    def __getattr__(self, name: str) -> Any:
        # models read attributes of their blocks (e.g. ``layer.attention_type``): fall through to the base
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    def update_layer(self, adapter_name: str, config: PeftConfig, key: str) -> None:
        if self.merged:
            raise MergeError(f"{key}: adapter {self.merged_adapters[0]!r} is merged; unmerge it before adding another.")
        self.copies[adapter_name] = copy.deepcopy(self.get_base_layer())

    def file_key(self, local_key: str, name: str) -> str:
        if self.strip_copy_prefix:
            prefix = f"{self.adapter_layer_names[0]}.{name}."
            return local_key[len(prefix):] if local_key.startswith(prefix) else local_key
        return super().file_key(local_key, name)

    # -- forward ------------------------------------------------------------------------------
    def _active_copy(self) -> Optional[nn.Module]:
        active = [n for n in self.active_adapters if n in self.copies]
        if not active:
            return None
        if len(active) > 1:
            raise PeftkitError(
                f"{len(active)} {self.method_name} adapters are active on one module ({active}); each replaces the "
                "module, so only one can be active at a time. Call set_adapter with one name."
            )
        return self.copies[active[0]]

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> Any:
        module = None if self.merged else self._active_copy()
        return (module or self.base_layer)(x, *args, **kwargs)

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: MixedBatch) -> Any:
        names = tuple(self.copies.keys())
        if args or kwargs or not isinstance(x, torch.Tensor):
            raise PeftkitError(
                f"Mixed-adapter batches are not supported for {self.method_name} adapters on "
                f"{type(self.get_base_layer()).__name__} modules called with extra arguments (masks, caches): their "
                "rows cannot be run separately. Run one adapter per batch."
            )
        idx = mixed.index(names, x.device, x.shape[0])
        return run_rows_by_slot(x, idx, lambda s: self.base_layer if s == 0 else self.copies[names[s - 1]])

    # -- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        names = self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.adapter_names]
        todo = [n for n in names if n not in self.merged_adapters]
        if todo and len(todo) + len(self.merged_adapters) > 1:
            raise MergeError(
                f"{self.method_name} adapters replace the module they tune, so only one can be merged at a time; "
                f"asked to merge {todo} (merged already: {self.merged_adapters})."
            )
        super().merge(todo, safe_merge)

    @staticmethod
    def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
        out = dict(module.named_parameters())
        out.update(module.named_buffers())
        return out

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self._tensors(self.get_base_layer())
        tuned = self._tensors(self.copies[name])
        if safe_merge and any(t.is_floating_point() and not torch.isfinite(t).all() for t in tuned.values()):
            raise MergeError(f"Adapter {name!r} has NaN/inf weights; the adapter is broken. Nothing was merged.")
        self._stash = {k: t.detach().clone() for k, t in base.items()}
        with torch.no_grad():
            for k, t in base.items():
                t.copy_(tuned[k])

    def _unmerge_one(self, name: str) -> None:
        if self._stash is None:
            return
        with torch.no_grad():
            for k, t in self._tensors(self.get_base_layer()).items():
                t.copy_(self._stash[k])
        self._stash = None


# ---------------------------------------------------------------------------------------------
# BitFit


@register_config
@dataclass
class BitFitConfig(PeftConfig):
    """Config of BitFit: train only bias terms.

    Args:
        target_modules: ``None`` trains the bias of every module that has one; otherwise module names
            (exact or dotted suffix) or a regex (full match) selecting the modules whose bias trains
            (e.g. ``["query", "intermediate.dense"]``). Matched modules without a bias are skipped.
        exclude_modules: modules whose bias never trains (same forms).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
    """

    PEFT_TYPE = PeftType.BITFIT

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.modules_to_save = _as_list(self.modules_to_save)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("BitFitConfig.target_modules is an empty list; use None to train every bias.")


def _has_bias(module: nn.Module) -> bool:
    if isinstance(module, BitFitLayer):
        return True
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def find_bias_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Every module with a bias parameter (or those matching target_modules); TargetError if none."""
    keys, biasless = [], []
    for key, module in _outer_modules(model):
        if not key or isinstance(module, ModulesToSaveWrapper) or excluded(config, key) or in_modules_to_save(config, key):
            continue
        if config.target_modules is None:
            if isinstance(module, AdapterLayer) and not isinstance(module, BitFitLayer):
                continue  # a module adapted by another method is not ours to touch
        elif not _matches_list(key, config.target_modules):
            continue
        (keys if _has_bias(module) else biasless).append(key)
    if not keys:
        if config.target_modules is None:
            raise TargetError(
                "BitFit found no bias to train: no module of the model has a bias parameter (Llama- and T5-style "
                "models are built without biases). Use another method, e.g. IA3Config or LNTuningConfig."
            )
        if biasless:
            shown = ", ".join(biasless[:8]) + (" ..." if len(biasless) > 8 else "")
            raise TargetError(
                f"BitFit found no bias to train: the modules matching target_modules={config.target_modules!r} have no "
                f"bias parameter ({shown})."
            )
        raise TargetError(_no_match(model, "target_modules", config.target_modules))
    return keys


# channel axis of the bias in the output of common module types (for mixed batches)
def _bias_axis(module: nn.Module) -> Optional[int]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D, nn.LayerNorm, nn.Bilinear)):
        return -1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1
    return None


class BitFitLayer(AdapterLayer):
    """BitFit on a module with a bias ``b0``: ``y = f(x; W, b_eff)``, ``b_eff = b0 + Σ_active (b_a − b0)``.

    ``bitfit_bias[a]`` has the shape of ``b0`` (e.g. (out,) for a linear map, (C,) for a conv or a norm).
    """

    adapter_layer_names = ("bitfit_bias",)
    save_key_renames = {"bitfit_bias": "bias"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self._original_bias: Optional[torch.Tensor] = None  # the base bias while adapters are merged

    def update_layer(self, adapter_name: str, config: BitFitConfig, key: str) -> None:
        bias = self.get_base_layer()._parameters.get("bias")
        if not isinstance(bias, nn.Parameter):
            raise TargetError(f"{key} ({type(self.get_base_layer()).__name__}) has no bias to train.")
        source = self._original_bias if self._original_bias is not None else bias
        self.bitfit_bias[adapter_name] = nn.Parameter(source.detach().clone())

    def _reference(self) -> torch.Tensor:
        """The base bias without any merged adapter."""
        return self._original_bias if self._original_bias is not None else self.get_base_layer().bias

    def effective_bias(self, names: list[str]) -> torch.Tensor:
        base_bias = self.get_base_layer().bias
        if len(names) == 1 and not self.merged:
            return self.bitfit_bias[names[0]].to(base_bias.dtype)
        ref = self._reference().float()
        out = base_bias.float()
        for n in names:
            out = out + (self.bitfit_bias[n].float() - ref)
        return out.to(base_bias.dtype)

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> Any:
        names = [n for n in self.active_adapters if n in self.bitfit_bias and n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        bias = self.effective_bias(names)
        return torch.func.functional_call(self.base_layer, {"bias": bias}, (x, *args), kwargs)

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: MixedBatch) -> torch.Tensor:
        """base(x) plus each row's gathered ``b_a − b0`` along the channel axis (slot 0: zeros)."""
        names = tuple(self.bitfit_bias.keys())
        result = self.base_layer(x, *args, **kwargs)
        if not names:
            return result
        base = self.get_base_layer()
        axis = _bias_axis(base)
        if axis is None:
            raise PeftkitError(
                f"Mixed-adapter batches for BitFit are supported on linear, conv and norm layers, not on "
                f"{type(base).__name__}."
            )
        ref = base.bias.float()
        deltas = torch.stack([torch.zeros_like(ref)] + [self.bitfit_bias[n].float() - ref for n in names])
        rows = deltas.index_select(0, mixed.index(names, result.device, result.shape[0]))  # (batch, *bias.shape)
        if axis == -1:
            rows = rows.view(rows.shape[0], *([1] * (result.dim() - rows.dim())), *rows.shape[1:])
        else:
            rows = rows.view(rows.shape[0], rows.shape[1], *([1] * (result.dim() - 2)))
        return (result.float() + rows).to(result.dtype) if result.dtype != rows.dtype else result + rows

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        if self._original_bias is None:
            new = self.bitfit_bias[name].detach().float()
        else:
            new = base.bias.float() + (self.bitfit_bias[name].detach().float() - self._original_bias.float())
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"Merging adapter {name!r} gives NaN/inf biases; the adapter is broken. Nothing was merged.")
        with torch.no_grad():
            if self._original_bias is None:
                self._original_bias = base.bias.detach().clone()
            base.bias.copy_(new.to(base.bias.dtype))

    def _unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            if not self.merged_adapters:  # the last merged adapter: restore the original exactly
                base.bias.copy_(self._original_bias)
                self._original_bias = None
            else:
                delta = self.bitfit_bias[name].detach().float() - self._original_bias.float()
                base.bias.copy_((base.bias.float() - delta).to(base.bias.dtype))


def make_bitfit_layer(target: nn.Module, config: BitFitConfig, adapter_name: str, key: str) -> BitFitLayer:
    layer = BitFitLayer(target)
    layer.update_layer(adapter_name, config, key)
    return layer


register_method(Method(
    peft_type=PeftType.BITFIT,
    config_cls=BitFitConfig,
    layer_types=(BitFitLayer,),
    make_layer=make_bitfit_layer,
    prefix="bitfit_",
    find_targets=find_bias_targets,
))


# ---------------------------------------------------------------------------------------------
# partial fine-tuning


@register_config
@dataclass
class PartialConfig(PeftConfig):
    """Config of partial fine-tuning: train whole blocks or named modules, save only their tensors.

    Args:
        num_last_layers: train the last N transformer blocks (of each block list: an encoder-decoder
            has two). The block list is the ``nn.ModuleList`` named by ``layers_pattern`` (default
            one of ``layers``, ``h``, ``block``, ``blocks``, ``layer``).
        target_modules: modules trained in full: names (exact or dotted suffix) or a regex (full
            match), e.g. ``["lm_head", "model.norm"]``. Combined with ``num_last_layers`` if both are given.
        exclude_modules: modules never selected (same forms).
        layers_pattern: name(s) of the block list(s) for ``num_last_layers``.
        modules_to_save: modules trained in full (e.g. a classifier); added for the task type.
    """

    PEFT_TYPE = PeftType.PARTIAL

    num_last_layers: Optional[int] = None
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.layers_pattern = _as_list(self.layers_pattern)
        self.modules_to_save = _as_list(self.modules_to_save)
        if self.num_last_layers is not None:
            positive_int(self, "num_last_layers", self.num_last_layers)
        if self.num_last_layers is None and not self.target_modules:
            raise ConfigError("PartialConfig needs num_last_layers (train the last N blocks) or target_modules "
                              "(train these modules), or both.")


def block_lists(model: nn.Module, layers_pattern: Any = None) -> list[tuple[str, nn.ModuleList]]:
    """The outermost non-empty ``nn.ModuleList``\\ s named by ``layers_pattern`` (the transformer block lists)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or DEFAULT_LAYERS_PATTERN)
    found: list[tuple[str, nn.ModuleList]] = []
    for key, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or key.rsplit(".", 1)[-1] not in patterns:
            continue
        if any(key.startswith(k + ".") for k, _ in found):
            continue
        found.append((key, module))
    return found


def find_partial_targets(model: nn.Module, config: PartialConfig) -> list[str]:
    keys: list[str] = []
    if config.num_last_layers is not None:
        stacks = block_lists(model, config.layers_pattern)
        if not stacks:
            pattern = config.layers_pattern or list(DEFAULT_LAYERS_PATTERN)
            raise TargetError(
                f"PartialConfig.num_last_layers: the model has no list of transformer blocks (an nn.ModuleList named "
                f"{pattern}); set layers_pattern to the name of its block list, or select modules with target_modules."
            )
        n = config.num_last_layers
        for key, blocks in stacks:
            if n > len(blocks):
                raise TargetError(
                    f"PartialConfig.num_last_layers={n} but {key} has only {len(blocks)} blocks; use at most {len(blocks)}."
                )
            keys += [f"{key}.{i}" for i in range(len(blocks) - n, len(blocks))]
    if config.target_modules is not None:
        matched = [k for k, _ in _outer_modules(model) if k and _matches_list(k, config.target_modules)]
        if not matched:
            raise TargetError(_no_match(model, "target_modules", config.target_modules))
        keys += matched
    keys = [k for k in keys if not excluded(config, k) and not in_modules_to_save(config, k)]
    keys = _outermost(keys)
    if not keys:
        raise TargetError("PartialConfig selects no module (everything it matched is excluded or in modules_to_save).")
    for key in keys:
        module = model.get_submodule(key)
        inner = [k for k, m in module.named_modules() if k and isinstance(m, AdapterLayer)]
        if inner and not isinstance(module, PartialLayer):
            raise TargetError(
                f"{key} contains adapter layers of another adapter ({key}.{inner[0]}); partial fine-tuning copies whole "
                "modules and cannot be combined with other adapters inside them."
            )
    return keys


class PartialLayer(CopyLayer):
    """Partial fine-tuning of one block or module: ``y = copy_a(x, ...)`` for the active adapter ``a``."""

    strip_copy_prefix = True
    method_name = "partial fine-tuning"
    adapter_layer_names = ("partial_layers",)


def make_partial_layer(target: nn.Module, config: PartialConfig, adapter_name: str, key: str) -> PartialLayer:
    if not any(True for _ in target.parameters()):
        raise TargetError(f"{key} ({type(target).__name__}) has no parameters to train.")
    layer = PartialLayer(target)
    layer.update_layer(adapter_name, config, key)
    return layer


register_method(Method(
    peft_type=PeftType.PARTIAL,
    config_cls=PartialConfig,
    layer_types=(PartialLayer,),
    make_layer=make_partial_layer,
    prefix="partial_layers",
    find_targets=find_partial_targets,
    autocast_adapter_dtype=False,
))
