"""The method registry: one entry per method family, each defined in its own file.

A method contributes a config class, the wrapper layer classes it uses, a function that builds the
wrapper for a target module, and default target modules per model type. The injection engine
(:mod:`peftkit.inject`) does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..config import PeftConfig
    from ..inject import AdapterLayer


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type
    layer_types: tuple[type, ...]
    make_layer: Callable[["nn.Module", "PeftConfig", str, str], "AdapterLayer"]
    # prefix of the in-memory parameter names of this method (e.g. "lora_"), used for freezing
    prefix: str
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    # Optional hooks, for methods whose targets are not (only) ``target_modules`` name matches:
    # ``prepare(config, model)`` fills method-specific defaults into the (copied) config before the
    # generic default-target lookup; ``find_targets(model, config)`` returns the module keys to wrap
    # (and raises a PeftkitError if there are none) instead of the generic name matching.
    prepare: Optional[Callable[["PeftConfig", "nn.Module"], None]] = None
    find_targets: Optional[Callable[["nn.Module", "PeftConfig"], list[str]]] = None
    # False for methods whose adapter tensors are copies of base modules and must keep their dtype
    autocast_adapter_dtype: bool = True


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[str(method.peft_type)] = method
    return method


def method_for(config: "PeftConfig") -> Method:
    try:
        return _METHODS[str(config.peft_type)]
    except KeyError:
        raise ConfigError(
            f"peft_type {config.peft_type} has no layer method in peftkit; known: {', '.join(sorted(_METHODS))}."
        ) from None


def all_methods() -> dict[str, Method]:
    return dict(_METHODS)


from . import lora  # noqa: E402,F401  (registers LoRA)
from . import ia3, selective, ln_tuning, bottleneck  # noqa: E402,F401  (IA3, BitFit, partial, LN tuning, adapters)
from . import prompt  # noqa: E402,F401  (registers the soft-prompt configs; they run in peftkit.prompt_model)
