"""The adapter-layer protocol: the base class of every wrapper layer.

A targeted module is replaced by a subclass of :class:`AdapterLayer` that keeps the original as
``base_layer`` and holds named adapters in ``ModuleDict`` / ``ParameterDict`` containers (listed in
``adapter_layer_names``), so in-memory keys read ``...q_proj.lora_A.default.weight`` and file keys
the same with the adapter name dropped (:meth:`AdapterLayer.file_key`). One protocol drives
freezing, saving and merging: :meth:`AdapterLayer.adapter_param_items` lists an adapter's tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..errors import MergeError
from .memory import creating_on_meta
from .mixed import MixedBatch, current_mixed_batch

if TYPE_CHECKING:
    from ..config import PeftConfig


class AdapterLayer(nn.Module):
    """Base of every wrapper layer. Keeps the wrapped module as ``base_layer``; adapters are named.

    Subclasses list the attributes that hold per-adapter tensors in ``adapter_layer_names``
    (``nn.ModuleDict`` / ``nn.ParameterDict`` keyed by adapter name) and per-adapter settings in
    ``other_param_names`` (plain dicts). Forward has four states: disabled (base only), merged (base
    only, the weights hold the delta), active adapters (base + their deltas), mixed batch (each row
    its own adapter).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    # in-memory key suffix -> file key suffix, applied after the adapter name is removed
    save_key_renames: dict[str, str] = {}
    mergeable: bool = True
    # False (peftkit.helpers.disable_input_dtype_casting, per instance): inputs reach the adapter's
    # modules in their own dtype (hooks on the modules may cast the weights), not cast to the weights'
    cast_input_dtype_enabled: bool = True
    merge_hint: str = ""  # why a non-mergeable layer cannot be merged (appended to the error)
    # a layer that adapts one parameter of its base module (``target_parameters``) names it here;
    # such layers nest, one per parameter of the same module (None: the layer wraps the module)
    parameter_name: Optional[str] = None

    # Layers of methods that may wrap another method's layer on the same module (the outer one's base
    # is the inner wrapper): their forward calls ``base_layer`` and adds or scales, their merge writes the
    # innermost weight, so a stack computes and merges as the composition it is (inner first).
    stackable = False

    def stacks_another_method(self, other: nn.Module) -> bool:
        """Whether ``other`` is a stackable adapter layer of another method than this one (a layer the
        stacking of methods on one module puts inside or around this one)."""
        return (isinstance(other, AdapterLayer) and other.stackable
                and type(other).adapter_layer_names != type(self).adapter_layer_names)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models read e.g. ``layer.weight.dtype``)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    def _adapter_device(self) -> torch.device:
        """Where new adapter tensors go: the device of the base layer's first parameter or buffer
        (``meta`` inside :func:`peftkit.core.memory.adapters_on_meta`: ``low_cpu_mem_usage``)."""
        if creating_on_meta():
            return torch.device("meta")
        return self.base_device()

    def base_device(self) -> torch.device:
        """The device of the base layer's first parameter or buffer (CPU if it has none)."""
        base = self.get_base_layer()
        first = next(itertools.chain(base.parameters(), base.buffers()), None)
        return torch.device("cpu") if first is None else first.device

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    def update_layer(self, adapter_name: str, config: "PeftConfig", key: str) -> None:
        """Create (or re-create) the tensors of ``adapter_name`` for this layer."""
        raise NotImplementedError

    # -- Hugging Face PEFT's BaseTunerLayer names ------------------------------------------------
    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active), as Hugging Face PEFT's layers."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def _adapters(self) -> set[str]:
        """Hugging Face PEFT's name for the adapters of a modules_to_save / trainable-tokens wrapper."""
        return set(self.adapter_names)

    def _all_available_adapter_names(self) -> list[str]:
        """Hugging Face PEFT's name of :attr:`adapter_names` (its tests and integrations call it)."""
        return self.adapter_names

    @property
    def disable_adapters(self) -> bool:
        """True while the layer computes its base output only (Hugging Face PEFT's name)."""
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the layer's adapters on (the active ones train again) or off (base output, nothing trains)."""
        if enabled:
            self.disabled = False
            self.set_adapter(self.active_adapters)
            return
        self.disabled = True
        for name in self.adapter_names:
            for _, tensor in self.adapter_param_items(name):
                tensor.requires_grad_(False)

    def set_adapter(self, names: str | Sequence[str], trainable: bool = True) -> None:
        """Activate ``names`` (those this layer has); their tensors train if ``trainable``. Drops the
        layer's caches (so this is also how to make it see weights replaced through ``.data``)."""
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.adapter_names]
        self.clear_cache()
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for name, value in container.items():
                want = trainable and name in self.active_adapters
                params = [value] if isinstance(value, nn.Parameter) else list(value.parameters())
                for p in params:
                    p.requires_grad_(want)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into {type(self).__name__}; unmerge it before deleting.")
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.clear_cache()

    def clear_cache(self) -> None:
        """Drop tensors cached from adapter weights (subclasses with caches override)."""

    def tied_layers(self) -> list["AdapterLayer"]:
        """Layers that write the same values into a base weight this layer shares with them (trainable
        tokens over tied embeddings): merging need not untie a weight shared only with them."""
        return []

    def adapter_param_items(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(local in-memory key, tensor) for every tensor of adapter ``name``."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if name not in container:
                continue
            value = container[name]
            if isinstance(value, nn.Parameter):
                yield f"{attr}.{name}", value
            else:
                for k, p in value.named_parameters():
                    yield f"{attr}.{name}.{k}", p

    def adapter_buffer_items(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(local in-memory key, buffer) of adapter ``name``'s saved buffers (a trained BatchNorm copy's
        running statistics); saved and loaded beside :meth:`adapter_param_items`, never trained."""
        return iter(())

    def file_key(self, local_key: str, name: str) -> str:
        """The checkpoint key of an in-memory key: the adapter name removed (Hugging Face rule)."""
        key = strip_adapter_name(local_key, name)
        for old, new in self.save_key_renames.items():
            if key == old or key.endswith("." + old):
                key = key[: len(key) - len(old)] + new
        return key

    # -- merging ------------------------------------------------------------------------------
    def adapters_to_merge(self, adapter_names: Optional[Sequence[str]] = None) -> list[str]:
        """What :meth:`merge` merges: the given adapters this layer holds (default: its active ones),
        less those merged already."""
        names = self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.adapter_names]
        return [n for n in dict.fromkeys(names) if n not in self.merged_adapters]

    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """MergeError if :meth:`merge` with these arguments would fail; changes nothing.

        The engine calls it on every layer before merging any (:func:`peftkit.core.merging.merge_layers`),
        so that a merge is all or nothing. With ``safe_merge`` it also fails when the merged weights
        would hold NaN/inf: here when an adapter's own tensors do; layers that can compute their
        merged values override it to check those (overflow included)."""
        if not self.mergeable:
            raise MergeError(f"{type(self).__name__} adapters cannot be merged into the base weights.{self.merge_hint}")
        if not safe_merge:
            return
        for name in self.adapters_to_merge(adapter_names):
            for key, tensor in self.adapter_param_items(name):
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken: it has "
                                     f"NaN/inf values in {key}. "
                                     "Nothing was merged.")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Merge the given (default: active) adapters into the base weights (Hugging Face PEFT's
        signature). The structural checks of :meth:`check_merge` run first; ``safe_merge`` checks each
        merged weight before it is written."""
        if adapter_names is None and not isinstance(safe_merge, bool):  # merge(["a", "b"]): names first
            safe_merge, adapter_names = False, safe_merge
        if isinstance(adapter_names, str):
            raise MergeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        self.check_merge(adapter_names)
        for name in self.adapters_to_merge(adapter_names):
            self._merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Disabled: the base only (merged adapters are unmerged first). Mixed batch: each row its own
        adapter (:meth:`_mixed_forward`). Otherwise the active adapters (:meth:`_active_forward`)."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        mixed = current_mixed_batch()
        if mixed is not None:
            self._check_mixed()
            return self._mixed_forward(x, args, kwargs, mixed)
        return self._active_forward(x, args, kwargs)

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: "MixedBatch") -> Any:
        raise NotImplementedError

    def _check_mixed(self) -> None:
        if self.merged:
            raise MergeError("adapter_names (mixed batches) cannot be used while adapters are merged; unmerge first.")

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        raise MergeError(f"{type(self).__name__} does not support merging.")

    def _unmerge_one(self, name: str) -> None:
        raise MergeError(f"{type(self).__name__} does not support unmerging.")

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


def check_merged_finite(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        weight_dtype: Optional[torch.dtype], bias_dtype: Optional[torch.dtype] = None) -> None:
    """safe_merge: MergeError (Hugging Face PEFT's phrase) unless the merged ``weight`` and ``bias`` are
    finite as they would be stored, in ``weight_dtype`` / ``bias_dtype`` (default: the weight's; None, a
    quantized base, checks the values as given). Shared by the layers that compute merged weights."""
    bias_dtype = bias_dtype or weight_dtype
    if bias is not None and not torch.isfinite(bias if bias_dtype is None else bias.to(bias_dtype)).all():
        raise MergeError(f"NaNs detected in the merged bias. The adapter {name} seems to be broken: merging adapter "
                         f"{name!r} gives a NaN/inf bias. Nothing was merged.")
    if not torch.isfinite(weight if weight_dtype is None else weight.to(weight_dtype)).all():
        raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken: merging adapter "
                         f"{name!r} gives NaN/inf weights. Nothing was merged.")


def strip_adapter_name(key: str, name: str) -> str:
    """``v_proj.lora_A.default.weight`` -> ``v_proj.lora_A.weight``; ``emb.lora_embedding_A.default`` ->
    ``emb.lora_embedding_A``. Only the end of the key is edited, so module names equal to the
    adapter name are safe."""
    suffix = "." + name
    if key.endswith(suffix):
        return key[: -len(suffix)]
    head, _, last = key.rpartition(".")
    if head.endswith(suffix):
        return head[: -len(suffix)] + "." + last
    return key


__all__ = ["AdapterLayer", "check_merged_finite", "strip_adapter_name"]
