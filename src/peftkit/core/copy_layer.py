"""A module tuned in full, one trainable copy per adapter: the layer of partial fine-tuning and
LayerNorm tuning (methods that train a subset of the model's own tensors).

The tuned tensors are per-adapter deep copies held by the wrapper; the original module stays frozen
as ``base_layer``, so these methods keep what every peftkit method has: several named adapters,
``disable_adapter``, merging (the copy's tensors written into the original, which is kept for an
exact unmerge), saving only the tuned tensors. A mixed batch runs each distinct adapter's copy on
that adapter's rows (an index_select per distinct adapter, not per row); modules called with extra
arguments (whole transformer blocks with masks and caches) cannot be split by rows and raise.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..errors import MergeError, PeftkitError, TargetError
from .layer import AdapterLayer
from .mixed import MixedBatch, run_rows_by_slot

if TYPE_CHECKING:
    from ..config import PeftConfig


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

    @classmethod
    def wrap(cls, target: nn.Module, config: "PeftConfig", adapter_name: str, key: str) -> "CopyLayer":
        """A layer of this class around ``target`` holding adapter ``adapter_name`` (a method's
        ``make_layer``); TargetError if ``target`` has no parameters to train."""
        if not any(True for _ in target.parameters()):
            raise TargetError(f"{key} ({type(target).__name__}) has no parameters to train.")
        layer = cls(target)
        layer.update_layer(adapter_name, config, key)
        return layer

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
    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Only one adapter can be merged at a time; with ``safe_merge`` its copy must be finite."""
        todo = self.adapters_to_merge(adapter_names)
        if todo and len(todo) + len(self.merged_adapters) > 1:
            raise MergeError(
                f"{self.method_name} adapters replace the module they tune, so only one can be merged at a time; "
                f"asked to merge {todo} (merged already: {self.merged_adapters})."
            )
        super().check_merge(adapter_names, safe_merge)

    @staticmethod
    def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
        out = dict(module.named_parameters())
        out.update(module.named_buffers())
        return out

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self._tensors(self.get_base_layer())
        tuned = self._tensors(self.copies[name])
        if safe_merge and any(t.is_floating_point() and not torch.isfinite(t).all() for t in tuned.values()):
            raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken (NaN/inf "
                             "weights). Nothing was merged.")
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


__all__ = ["CopyLayer"]
