"""Compatibility module: ``from peftkit.utils.hotswap import hotswap_adapter`` as from ``peft.utils.hotswap``.

The code lives in :mod:`peftkit.hotswap`.
"""

from ..hotswap import (
    CONFIG_KEYS_TO_CHECK,
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]
