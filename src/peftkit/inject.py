"""Compatibility module: the injection engine now lives in :mod:`peftkit.core`.

``from peftkit.inject import AdapterLayer, mixed_batch, ...`` keeps working; new code imports from
``peftkit.core`` (see docs/architecture.md).
"""

from .core.base_call import call_base, plain_linear_params
from .core.inject import adapter_layers, check_mergeable, inject, prepare_config, unload
from .core.layer import AdapterLayer, strip_adapter_name
from .core.mixed import (
    BASE_ADAPTER,
    MixedBatch,
    RowPlan,
    check_adapter_names,
    current_mixed_batch,
    mixed_batch,
    run_rows_by_slot,
)
from .core.modules_to_save import ModulesToSaveWrapper, add_modules_to_save
from .core.targets import (
    DEFAULT_LAYERS_PATTERN,
    closest_module_names,
    excluded,
    find_targets,
    get_submodule_parent,
    in_modules_to_save,
    is_target,
    linear_module_names,
    model_type_of,
)

__all__ = [
    "BASE_ADAPTER",
    "DEFAULT_LAYERS_PATTERN",
    "AdapterLayer",
    "MixedBatch",
    "ModulesToSaveWrapper",
    "RowPlan",
    "adapter_layers",
    "add_modules_to_save",
    "call_base",
    "check_adapter_names",
    "check_mergeable",
    "closest_module_names",
    "current_mixed_batch",
    "excluded",
    "find_targets",
    "get_submodule_parent",
    "in_modules_to_save",
    "inject",
    "is_target",
    "linear_module_names",
    "mixed_batch",
    "model_type_of",
    "plain_linear_params",
    "prepare_config",
    "run_rows_by_slot",
    "strip_adapter_name",
    "unload",
]
