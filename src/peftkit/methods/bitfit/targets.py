"""BitFit's targets: every module with a bias parameter, or those ``target_modules`` name."""

from __future__ import annotations

from torch import nn

from ...core.layer import AdapterLayer
from ...core.modules_to_save import ModulesToSaveWrapper
from ...core.targets import excluded, in_modules_to_save, matches_names, no_match, outer_modules
from ...errors import TargetError
from .config import BitFitConfig
from .layer import BitFitLayer


def _has_bias(module: nn.Module) -> bool:
    if isinstance(module, BitFitLayer):
        return True
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    return isinstance(module._parameters.get("bias"), nn.Parameter)


def find_bias_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Every module with a bias parameter (or those matching target_modules); TargetError if none."""
    keys, biasless = [], []
    for key, module in outer_modules(model):
        if not key or isinstance(module, ModulesToSaveWrapper) or excluded(config, key) or in_modules_to_save(config, key):
            continue
        if config.target_modules is None:
            if isinstance(module, AdapterLayer) and not isinstance(module, BitFitLayer):
                continue  # a module adapted by another method is not ours to touch
        elif not matches_names(key, config.target_modules):
            continue
        (keys if _has_bias(module) else biasless).append(key)
    if not keys:
        if config.target_modules is None:
            raise TargetError(
                "BitFit found no bias to train: no module of the model has a bias parameter (Llama- and T5-style "
                "models are built without biases). Use another method, e.g. IA3Config or LNTuningConfig."
            )
        if biasless:
            shown = ", ".join(biasless[:8]) + (" ..." if len(biasless) > 8 else "")
            raise TargetError(
                f"BitFit found no bias to train: the modules matching target_modules={config.target_modules!r} have no "
                f"bias parameter ({shown})."
            )
        raise TargetError(no_match(model, "target_modules", config.target_modules))
    return keys


__all__ = ["find_bias_targets"]
