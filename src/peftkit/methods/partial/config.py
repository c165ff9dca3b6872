"""Partial fine-tuning's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...config import PeftConfig, PeftType, as_list, positive_int
from ...errors import ConfigError


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
        self.target_modules = as_list(self.target_modules)
        self.exclude_modules = as_list(self.exclude_modules)
        self.layers_pattern = as_list(self.layers_pattern)
        self.modules_to_save = as_list(self.modules_to_save)
        if self.num_last_layers is not None:
            positive_int(self, "num_last_layers", self.num_last_layers)
        if self.num_last_layers is None and not self.target_modules:
            raise ConfigError("PartialConfig needs num_last_layers (train the last N blocks) or target_modules "
                              "(train these modules), or both.")


__all__ = ["PartialConfig"]
