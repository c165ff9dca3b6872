"""``modules_to_save``: modules trained in full beside an adapter (a classifier head, say).

Each adapter gets its own trainable deep copy of the module; the original stays for disabling and
for the rows of a mixed batch that use no adapter. In memory ``score.modules_to_save.<name>.weight``,
in the file ``score.weight`` (Hugging Face PEFT's keys).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..errors import TargetError
from .layer import AdapterLayer
from .mixed import current_mixed_batch, run_rows_by_slot
from .targets import get_submodule_parent, outer_modules


OWN_ATTRIBUTES = frozenset({"original_module", "modules_to_save", "disabled", "active_adapters", "merged_adapters"})


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full: each adapter gets its own copy; the original stays for disabling.

    In memory ``lm_head.modules_to_save.<name>.weight``, in the file ``lm_head.weight``.
    """

    adapter_layer_names = ("modules_to_save",)
    mergeable = False

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters = []
        self.merged_adapters = []
        self.disabled = False

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.original_module

    @property
    def weight(self) -> torch.Tensor:  # models that tie or inspect head weights read this
        return self.active_module().weight

    @property
    def bias(self) -> Any:
        return getattr(self.active_module(), "bias", None)

    def __getattr__(self, name: str) -> Any:
        """Other attributes (``in_features``, ...) are the active copy's, as in Hugging Face PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in OWN_ATTRIBUTES:
                raise
            return getattr(self.active_module(), name)

    def update_layer(self, adapter_name: str, config: Any = None, key: str = "") -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_

    def adapter_buffer_items(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The copy's persistent buffers (BatchNorm running statistics), saved as Hugging Face PEFT does."""
        if name in self.modules_to_save:
            for key, buffer in self.modules_to_save[name].state_dict(keep_vars=True).items():
                if not isinstance(buffer, nn.Parameter):
                    yield f"modules_to_save.{name}.{key}", buffer

    def file_key(self, local_key: str, name: str) -> str:
        prefix = f"modules_to_save.{name}."
        return local_key[len(prefix):] if local_key.startswith(prefix) else local_key

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """File key (below this module) -> in-memory key of adapter ``adapter_name``'s tensors
        (transformers' ``load_adapter`` asks every auxiliary wrapper for it)."""
        if adapter_name not in self.modules_to_save:
            return {}
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.modules_to_save[adapter_name].state_dict()}

    def active_module(self) -> nn.Module:
        """The copy of the active adapter, or the original when disabled or no adapter is active."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mixed = current_mixed_batch()
        if mixed is None or self.disabled or not args:  # keyword-only calls run the active copy on every row
            return self.active_module()(*args, **kwargs)
        x, args = args[0], args[1:]
        slots = tuple(self.modules_to_save.keys())
        idx = mixed.index(slots, x.device, x.shape[0])
        return run_rows_by_slot(x, idx, lambda s: self.original_module if s == 0 else self.modules_to_save[slots[s - 1]],
                                args, kwargs)

    def unwrap(self, merge: bool) -> nn.Module:
        """What replaces the wrapper when adapters are removed: the active copy if ``merge``, else the original."""
        return self.active_module() if merge else self.original_module


def add_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Wrap every module whose key ends with one of ``names`` in a :class:`ModulesToSaveWrapper`."""
    found = []
    for key, module in list(outer_modules(model)):
        if not key or isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
            continue
        if not any(key == n or key.endswith("." + n) for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update_layer(adapter_name)
        else:
            wrapper = ModulesToSaveWrapper(module)
            wrapper.update_layer(adapter_name)
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, wrapper)
        found.append(key)
    return found


def wrap_modules_to_save(model: nn.Module, names: Optional[Sequence[str]], adapter_name: str,
                         optional: Sequence[str] = ()) -> list[str]:
    """Wrap (or extend) the modules named in ``names`` for ``adapter_name``; returns their keys.

    A name in ``optional`` may match nothing (Hugging Face PEFT files list every head name of a task
    type, e.g. ``["classifier", "score"]``, though a model has one of them); any other name that
    matches nothing raises a TargetError after undoing what this call wrapped."""
    if not names:
        return []
    found = add_modules_to_save(model, names, adapter_name)
    missing = [m for m in names if m not in optional and not any(k == m or k.endswith("." + m) for k in found)]
    if missing:
        remove_modules_to_save(model, adapter_name)
        raise TargetError(f"modules_to_save {missing} match no module of the model; leave them out or use the "
                          "model's module names.")
    return found


def remove_modules_to_save(model: nn.Module, adapter_name: str) -> None:
    """Drop ``adapter_name``'s copies; a wrapper left with no copy gives its place back to the original."""
    for key, module in reversed(list(model.named_modules())):
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.adapter_names:
            module.delete_adapter(adapter_name)
            if not module.adapter_names:
                parent, child = get_submodule_parent(model, key)
                setattr(parent, child, module.original_module)


class AuxiliaryTrainingWrapper(abc.ABC):
    """Hugging Face PEFT's name for the wrappers that train a whole base module or a part of it beside an
    adapter: ``isinstance(module, AuxiliaryTrainingWrapper)`` holds for :class:`ModulesToSaveWrapper` and
    :class:`~peftkit.core.trainable_tokens.TrainableTokensWrapper` (registered there)."""


AuxiliaryTrainingWrapper.register(ModulesToSaveWrapper)


__all__ = ["AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "add_modules_to_save", "remove_modules_to_save", "wrap_modules_to_save"]
