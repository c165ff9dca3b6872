"""The engine every layer method runs on.

Modules, from the bottom: :mod:`~peftkit.core.mixed` (which adapter each row of a batch uses),
:mod:`~peftkit.core.base_call` (calling a wrapped base layer), :mod:`~peftkit.core.kernels`
(batched matmuls and row-wise dropout of mixed batches), :mod:`~peftkit.core.dispatch` (linear /
conv kinds), :mod:`~peftkit.core.layer` (the adapter-layer protocol), :mod:`~peftkit.core.targets`
(target matching), :mod:`~peftkit.core.modules_to_save`, :mod:`~peftkit.core.copy_layer` (one
trainable copy per adapter), :mod:`~peftkit.core.merging` (merging a model all or nothing) and
:mod:`~peftkit.core.inject` (injection and unloading); beside them :mod:`~peftkit.core.names`
(adapter names), :mod:`~peftkit.core.undo` (base weights put back when creating an adapter fails)
and :mod:`~peftkit.core.memory` (size checks before allocating).

Modules inside ``core`` import each other directly, never this package; code outside may import
the names below from here.
"""

from .copy_layer import CopyLayer
from .inject import adapter_layers, check_mergeable, inject, prepare_config, unload
from .layer import AdapterLayer, strip_adapter_name
from .mixed import BASE_ADAPTER, MixedBatch, RowPlan, check_adapter_names, current_mixed_batch, mixed_batch
from .modules_to_save import ModulesToSaveWrapper, add_modules_to_save, remove_modules_to_save, wrap_modules_to_save
from .targets import get_submodule_parent, linear_module_names, model_type_of, outer_modules

__all__ = [
    "BASE_ADAPTER",
    "AdapterLayer",
    "CopyLayer",
    "MixedBatch",
    "ModulesToSaveWrapper",
    "RowPlan",
    "adapter_layers",
    "add_modules_to_save",
    "check_adapter_names",
    "check_mergeable",
    "current_mixed_batch",
    "get_submodule_parent",
    "inject",
    "linear_module_names",
    "mixed_batch",
    "model_type_of",
    "outer_modules",
    "prepare_config",
    "remove_modules_to_save",
    "strip_adapter_name",
    "unload",
    "wrap_modules_to_save",
]
