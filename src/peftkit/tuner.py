"""The tuner object: ``PeftModel.base_model`` for layer methods (Hugging Face PEFT's ``BaseTuner``).

In Hugging Face PEFT, ``peft_model.base_model`` is a ``LoraModel`` (``IA3Model``, ...) whose ``.model``
is the user's model, and third-party code reaches into it: ``model.base_model.model``,
``.peft_config``, ``.active_adapter(s)``, ``.set_adapter``, ``.merge_adapter``,
``.targeted_module_names``, ``.enable_adapter_layers`` ... :class:`BaseTuner` offers those names. The
bookkeeping itself is written once, in :class:`peftkit.PeftModel`; the tuner forwards to the
PeftModel that owns it (a plain reference kept outside the module tree, so ``state_dict`` and
``named_modules`` do not see it and ``copy.deepcopy`` of the PeftModel points the copy's tuner at the
copy). Each layer method names its tuner class in its registry record (``Method.tuner_cls``:
``LoraModel``, ``IA3Model``, ...), so that ``isinstance(model.base_model, LoraModel)`` holds.

A tuner is made by its PeftModel; building one directly (``LoraModel(model, config, name)``, which
Hugging Face PEFT allows) is not supported: use :func:`peftkit.get_peft_model` or
:func:`peftkit.inject_adapter_in_model`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

from torch import nn

from .config import PeftConfig
from .core.inject import adapter_layers
from .core.modules_to_save import ModulesToSaveWrapper
from .errors import PeftkitError, PeftkitWarning


class BaseTuner(nn.Module):
    """Holds the adapted model as ``.model`` (attribute access falls through to it) and offers Hugging
    Face PEFT's tuner API, forwarded to the owning PeftModel.

    Attributes:
        prefix: the prefix of the method's adapter tensor names (``"lora_"``), as in Hugging Face PEFT.
    """

    prefix: str = ""
    uses_shared_state: bool = False  # Hugging Face PEFT: no method of peftkit shares tensors across layers

    def __init__(self, model: nn.Module, owner: Any = None, *args: Any, **kwargs: Any) -> None:
        if owner is None or isinstance(owner, (PeftConfig, dict)) or args or kwargs:
            raise PeftkitError(f"{type(self).__name__} is made by a PeftModel; use peftkit.get_peft_model(model, config) "
                               "(its .base_model is this tuner) or peftkit.inject_adapter_in_model(config, model).")
        super().__init__()
        self.model = model
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in the module tree

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_owner"):
                raise
            return getattr(self.model, name)

    # -- the owner's state --------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._owner.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self._owner.active_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._owner.active_adapter

    @property
    def targeted_module_names(self) -> list[str]:
        """The keys (relative to ``.model``) of the modules wrapped by adapter layers (modules_to_save
        copies not included), as Hugging Face PEFT records them."""
        return targeted_module_names(self.model, list(self.peft_config))

    @property
    def targeted_parameter_names(self) -> list[str]:
        """The parameters adapted through ``target_parameters`` (none unless a method adapts bare parameters)."""
        found = [f"{key.replace('.base_layer', '')}.{layer.parameter_name}" for key, layer in adapter_layers(self.model)
                 if getattr(layer, "parameter_name", None) is not None]
        return sorted(set(found), key=found.index)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        """``model.config`` as a dict (a transformers config's ``to_dict()``, a dataclass's fields), or
        ``{"model_type": "custom"}`` for a model without one (Hugging Face PEFT's helper)."""
        config = getattr(model, "config", None)
        if config is None:
            return {"model_type": "custom"}
        if hasattr(config, "to_dict"):
            return config.to_dict()
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return dataclasses.asdict(config)
        return dict(config) if isinstance(config, dict) else {"model_type": "custom"}

    # -- forwarded operations -----------------------------------------------------------------
    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        self._owner.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._owner.delete_adapter(adapter_name)

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self._owner.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._owner.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        return self._owner.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self._owner.unload()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        self._owner.add_weighted_adapter(*args, **kwargs)

    def enable_adapter_layers(self) -> None:
        """Turn every adapter layer back on (the active adapters train again)."""
        for _, layer in adapter_layers(self.model):
            layer.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter layer off until :meth:`enable_adapter_layers` (the base output; nothing
        trains). Merged adapters are unmerged first. See ``PeftModel.disable_adapter`` for a context."""
        biased = [n for n in self.active_adapters if getattr(self.peft_config.get(n), "bias", "none") != "none"]
        if biased:
            bias = self.peft_config[biased[0]].bias
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                          "same output as the base model would without adaption.", PeftkitWarning, stacklevel=2)
        for _, layer in adapter_layers(self.model):
            if layer.merged:
                layer.unmerge()
            layer.enable_adapters(False)

    def _mark_only_adapters_as_trainable(self, model: Optional[nn.Module] = None) -> None:
        """Freeze everything but the active adapters (Hugging Face PEFT's private name, used by integrations)."""
        self._owner._apply_active()


def targeted_module_names(model: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> list[str]:
    """Keys of the modules of ``model`` wrapped by adapter layers (modules_to_save copies and layers nested
    in another excluded), each once: those of the first adapter, then the new ones of the next, ... (the
    order Hugging Face PEFT records them in)."""
    layers = [(key, layer) for key, layer in adapter_layers(model) if not isinstance(layer, ModulesToSaveWrapper)]
    names = list(adapter_names) if adapter_names is not None else []
    names += [n for _, layer in layers for n in layer.adapter_names if n not in names]
    out: dict[str, None] = {}
    for name in names:
        out.update((key, None) for key, layer in layers if name in layer.adapter_names)
    return [k for k in out if not any(k.startswith(o + ".") for o in out if o != k)]


__all__ = ["BaseTuner", "targeted_module_names"]
