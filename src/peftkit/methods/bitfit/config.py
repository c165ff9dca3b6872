"""BitFit's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...config import PeftConfig, PeftType, as_list
from ...errors import ConfigError


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
        self.target_modules = as_list(self.target_modules)
        self.exclude_modules = as_list(self.exclude_modules)
        self.modules_to_save = as_list(self.modules_to_save)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("BitFitConfig.target_modules is an empty list; use None to train every bias.")


__all__ = ["BitFitConfig"]
