"""The method registry: one :class:`Method` record per PEFT method. A leaf module.

A method is a folder under ``peftkit/methods/`` whose ``__init__`` calls :func:`register_method`
once; ``peftkit/methods/__init__.py`` lists the built-in folders (one import line each). Everything
else looks methods up here by ``peft_type``: config parsing (:func:`config_class_for`), the injection
engine (target defaults, layer factories), :class:`peftkit.PeftModel` (model class, combining),
checkpoints (state kept outside the layers) and the toolkit (method names). Nothing below the
methods imports a method.

A record holds only what differs between methods; every field but ``peft_type`` and
``config_cls`` is optional:

* layer methods (LoRA, IA3, ...) give ``make_layer`` and the ``layer_types`` it builds, and find
  their targets by ``target_modules`` (with ``default_targets`` per model type), or through
  ``prepare`` / ``find_targets`` hooks; ``make_param_layer`` adapts single parameters named by a
  config's ``target_parameters`` (LoRA on MoE expert tensors);
* methods whose adapters live outside the layers (soft prompts) give ``model_class`` (which
  PeftModel class runs them), ``make_encoder`` and ``extra_state`` (how their tensors are saved);
* ``combine`` implements ``add_weighted_adapter``; ``aliases`` adds toolkit names with config
  overrides (``dora`` = LoRA with ``use_dora=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ExtraState:
    """Adapter state a method keeps outside the wrapper layers (a prompt encoder, shared projections),
    saved in the adapter file beside the layer tensors.

    ``save(model, adapter_name)`` returns its file-keyed tensors. ``load(model, adapter_name, given,
    source)`` pops its own keys from ``given`` (file key -> tensor), checks them, raises a
    CheckpointError on a problem, and returns a function that copies them in: nothing changes until
    every tensor of the file has been checked. ``files(model, adapter_name)`` gives additional
    safetensors files written beside the adapter (``{file name: tensors}``), e.g. the weights of a
    reparameterizing encoder that the compatible file does not hold.
    """

    save: Callable[["nn.Module", str], dict[str, "torch.Tensor"]]
    load: Callable[["nn.Module", str, dict[str, "torch.Tensor"], str], Callable[[], None]]
    files: Optional[Callable[["nn.Module", str], dict[str, dict[str, "torch.Tensor"]]]] = None


@dataclass(frozen=True)
class Method:
    """Everything peftkit needs to know about one method (see the module doc).

    Args:
        peft_type: the ``peft_type`` string of its configs and files (``"LORA"``).
        config_cls: its :class:`~peftkit.PeftConfig` subclass.
        layer_types: the wrapper layer classes ``make_layer`` builds; a module already wrapped by
            one of them takes a new adapter of this method instead of being wrapped again.
        make_layer: ``(target module, config, adapter name, module key) -> AdapterLayer``.
        make_param_layer: ``(module, config, adapter name, parameter key, parameter name) ->
            AdapterLayer`` wrapping ``module`` (or a wrapper of another of its parameters) to adapt
            one parameter; set when the method's configs may have ``target_parameters``.
        default_targets: model type -> ``target_modules`` used when the config sets none.
        prepare: ``(config copy, model)``: fill method-specific defaults before the generic
            default-target lookup.
        find_targets: ``(model, config) -> module keys``, replacing name matching (raises a
            PeftkitError when nothing matches).
        after_inject: ``(model, config, adapter name, keys)``: runs inside the all-or-nothing block of
            injection once every target is wrapped (trainable tokens: a tied output head follows the
            input embedding's layer).
        model_class: ``(requested PeftModel class, config) -> the class to build``.
        make_encoder: ``(config, input embeddings or None, encoded) -> nn.Module``: the prompt
            encoder of a soft-prompt method (``encoded``: loaded for inference, holds its output).
        extra_state: see :class:`ExtraState`.
        combine: ``(peft_model, adapters, weights, new name, **options)``: ``add_weighted_adapter``.
        autocast_adapter_dtype: upcast fp16/bf16 adapter tensors to fp32 (False for methods whose
            adapter tensors are copies of base modules and keep their dtype).
        saves_embedding_layers: ``save_embedding_layers="auto"`` applies to its adapters.
        aliases: extra toolkit method names -> config field overrides.
        tuner_cls: the class of ``PeftModel.base_model`` for a layer method (a
            :class:`peftkit.tuner.BaseTuner` subclass named as Hugging Face PEFT's, e.g. ``LoraModel``).
    """

    peft_type: str
    config_cls: type
    layer_types: tuple[type, ...] = ()
    make_layer: Optional[Callable[..., Any]] = None
    make_param_layer: Optional[Callable[..., Any]] = None
    default_targets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    prepare: Optional[Callable[..., None]] = None
    find_targets: Optional[Callable[..., list[str]]] = None
    after_inject: Optional[Callable[..., None]] = None
    model_class: Optional[Callable[..., type]] = None
    make_encoder: Optional[Callable[..., Any]] = None
    extra_state: Optional[ExtraState] = None
    combine: Optional[Callable[..., None]] = None
    autocast_adapter_dtype: bool = True
    saves_embedding_layers: bool = False
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tuner_cls: Optional[type] = None

    @property
    def is_layer_method(self) -> bool:
        """Its adapters are wrapper layers inside the model (not soft prompts)."""
        return self.make_layer is not None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (once per ``peft_type``); returns it."""
    key = str(method.peft_type)
    old = _METHODS.get(key)
    if old is not None and old.config_cls is not method.config_cls:
        raise ConfigError(f"peft_type {key} is already registered (by {old.config_cls.__name__}); "
                          f"{method.config_cls.__name__} needs a peft_type of its own.")
    if (method.make_layer is None) == (method.model_class is None):
        raise ConfigError(f"Method {key}: give make_layer (a layer method) or model_class (adapters outside the "
                          "layers), exactly one.")
    _METHODS[key] = method
    return method


def lookup(peft_type: Any) -> Optional[Method]:
    """The record of ``peft_type`` (an enum member or its string), or None."""
    return _METHODS.get(str(peft_type))


def method_for(config: Any) -> Method:
    """The record of ``config.peft_type``; ConfigError listing the known methods if there is none."""
    return method_for_type(config.peft_type)


def method_for_type(peft_type: Any) -> Method:
    method = _METHODS.get(str(peft_type))
    if method is None:
        raise ConfigError(f"Unknown peft_type {str(peft_type)!r}; peftkit knows: {', '.join(sorted(_METHODS))}.")
    return method


def config_class_for(peft_type: Any) -> type:
    """The config class of ``peft_type`` (ConfigError if no method has it)."""
    return method_for_type(peft_type).config_cls


def all_methods() -> dict[str, Method]:
    """``peft_type`` -> record, in registration order."""
    return dict(_METHODS)


__all__ = ["ExtraState", "Method", "all_methods", "config_class_for", "lookup", "method_for", "method_for_type",
           "register_method"]
