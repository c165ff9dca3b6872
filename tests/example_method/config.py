"""The example method's config: which linear layers get a learned output shift."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from peftkit.config import PeftConfig, as_list


@dataclass
class ShiftConfig(PeftConfig):
    """Config of the output shift.

    Args:
        target_modules: linear layers with a bias (names, a regex, or "all-linear").
        modules_to_save: modules trained in full beside the adapter.
        init_zero: start from a zero shift (a no-op); ``False`` draws it from N(0, 1).
    """

    PEFT_TYPE = "SHIFT"

    target_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_zero: bool = True

    def validate(self) -> None:
        self.target_modules = as_list(self.target_modules)
        self.modules_to_save = as_list(self.modules_to_save)
