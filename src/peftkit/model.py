"""PeftModel and its task subclasses, get_peft_model: the adapters of a model, switching, merging, saving.

``PeftModel.base_model`` is the tuner object (:class:`peftkit.tuner.BaseTuner`) whose ``.model`` is the user's
model, so that in-memory keys read ``base_model.model.<module path>...`` exactly as in Hugging Face
PEFT. :class:`PeftModel` runs layer methods (LoRA, IA3, ...); methods whose adapters live outside
the layers name their own class in the registry (``Method.model_class``: the soft-prompt models of
:mod:`peftkit.prompt`), which subclasses this one and overrides the hooks marked below.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint import IncompatibleKeys, adapter_entries, save_adapters, set_peft_model_state_dict
from .config import TASK_HEADS, PeftConfig
from .core.inject import adapter_layers, check_mergeable, inject, prepare_config, remove_adapter, unload
from .core.copy_layer import CopyLayer
from .core.layer import AdapterLayer
from .core.memory import adapters_on_meta
from .core.merging import merge_layers
from .core.mixed import check_adapter_names, mixed_batch
from .core.modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from .core.names import check_new_name, check_plain_name, name_list
from .core.tying import tie_modules_to_save, wrap_trainable_tokens
from .core.undo import undo_base_edits_on_error
from .errors import AdapterNameError, ConfigError, PeftkitError
from .quant import dequantized, requantization_report
from .adapter_io import finite_weights, name_or_path, read_adapter
from .model_api import PeftModelApi, signed_by_base
from .registry import all_methods, lookup, method_for
from .tuner import BaseTuner

AdapterModel = BaseTuner  # the name of the tuner class before it offered Hugging Face PEFT's API


def check_clean_base(model: Any, config: Any = None) -> None:
    """PeftkitError unless ``model`` can be the base of a new PeftModel: an ``nn.Module`` that is not a
    PeftModel and holds no adapter layers (a second PeftModel on it would re-create, and on error
    delete, the first one's adapters; a soft-prompt ``config`` leaves the layers alone, so it may)."""
    if isinstance(model, PeftModel):
        raise PeftkitError("The model is already a PeftModel; add another adapter to it with "
                           "peft_model.load_adapter(path, adapter_name) or peft_model.add_adapter(name, config), or "
                           "pass a fresh base model.")
    if not isinstance(model, nn.Module):
        raise PeftkitError(f"The base model must be a torch.nn.Module, got {type(model).__name__}.")
    if not getattr(config, "is_prompt_learning", False) and any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise PeftkitError("The model already holds adapter layers (it is the base of another PeftModel, or "
                           "inject_adapter_in_model was called on it); a new PeftModel would re-initialise them. Use the "
                           "existing PeftModel's add_adapter / load_adapter, or start from a fresh base model (or "
                           "peft_model.unload()).")


class PeftModel(PeftModelApi, nn.Module):
    """A model with named adapters. Use :func:`get_peft_model` or :meth:`from_pretrained` to build one.

    Args:
        model: the base model (changed in place: targeted modules are wrapped).
        peft_config: the config of the first adapter.
        adapter_name: its name.
        autocast_adapter_dtype: keep adapter tensors in float32 over a float16/bfloat16 base.
        low_cpu_mem_usage: create the adapter's tensors on the meta device (to be loaded: see add_adapter).
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        check_clean_base(model, peft_config)
        self._check_kind(peft_config)
        check_new_name(adapter_name, [])
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._disabled = False
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.base_model = self._wrap_base(model, peft_config)
        self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.set_adapter(adapter_name)

    # -- hooks for PeftModels of methods outside the layers --------------------------------------
    def _wrap_base(self, model: nn.Module, peft_config: PeftConfig) -> nn.Module:
        """``base_model``: the method's tuner (``Method.tuner_cls``, e.g. ``LoraModel``) holding ``model``."""
        return (method_for(peft_config).tuner_cls or BaseTuner)(model, self)

    def _check_kind(self, config: PeftConfig) -> None:
        """ConfigError if this class cannot run ``config``'s method."""
        method = lookup(config.peft_type) if isinstance(config, PeftConfig) else None
        if method is not None and not method.is_layer_method:
            raise ConfigError(f"{config.peft_type} adapters do not live in the layers; build the model with "
                              "get_peft_model (or PeftModel.from_pretrained), which picks the class that runs them.")

    def _create_adapter(self, adapter_name: str, peft_config: PeftConfig) -> PeftConfig:
        """Build ``adapter_name``'s tensors; returns ``peft_config``, filled from the model. All-or-nothing."""
        model = self.get_base_model()
        config = prepare_config(peft_config, model)
        inject(model, config, adapter_name)
        try:
            heads = TASK_HEADS.get(str(config.task_type), []) if config.task_type else []
            wrap_modules_to_save(model, getattr(config, "modules_to_save", None), adapter_name, optional=heads)
            tie_modules_to_save(model, config, adapter_name)
            wrap_trainable_tokens(model, config, adapter_name)
        except Exception:
            self._remove_adapter_tensors(adapter_name)
            raise
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = name_or_path(model)
        vars(peft_config).update(vars(config))  # the given object is the adapter's config, as in Hugging Face PEFT
        return peft_config

    def _remove_adapter_tensors(self, name: str) -> None:
        """Drop every tensor of adapter ``name``; wrappers left with no adapter are unwrapped."""
        remove_adapter(self.get_base_model(), name)

    def _apply_active(self) -> None:
        """Activate ``self._active`` in every layer and set requires_grad (only active adapters train)."""
        model = self.get_base_model()
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in self._layers():
            trainable = any(not self.peft_config[n].inference_mode for n in self._active if n in layer.adapter_names)
            layer.set_adapter(self._active, trainable=trainable)
        for name in self._active:
            config = self.peft_config[name]
            bias = getattr(config, "bias", "none")
            if config.inference_mode or bias == "none":
                continue
            for mem_key, _, tensor in adapter_entries(model, name, bias):
                if isinstance(tensor, nn.Parameter) and "bias" in mem_key.rsplit(".", 1)[-1]:
                    tensor.requires_grad_(True)

    def _check_active(self, names: list[str]) -> None:
        """PeftkitError if ``names`` cannot be active together (layer methods: any set, unless two of them
        train a copy of the same module in modules_to_save: which copy would run is undefined)."""
        for key, layer in self._layers():
            if isinstance(layer, ModulesToSaveWrapper) and len([n for n in names if n in layer.adapter_names]) > 1:
                raise AdapterNameError(f"Only one adapter can be set at a time for ModulesToSaveWrapper: {key} is in "
                                       f"modules_to_save of several of {names}; activate one of them.")

    # -- attribute fall-through -----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "_active"):
                raise
            return getattr(self.base_model, name)

    @property
    def model(self) -> nn.Module:
        return self.get_base_model()

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers inside; see :meth:`unload` for a clean one)."""
        return self.base_model.model

    # -- adapters -----------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_peft_config(self) -> PeftConfig:
        if not self._active:
            raise AdapterNameError("The model has no adapter (the last one was deleted); add one with add_adapter or "
                                   "load_adapter.")
        return self.peft_config[self._active[0]]

    def _layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return adapter_layers(self.get_base_model())

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: Optional[bool] = None) -> None:
        """Add a new adapter (inactive unless it is the first); the model is unchanged on error.
        ``low_cpu_mem_usage``: its layer tensors are created on the meta device, uninitialised, until a
        state dict is loaded into them. ``autocast_adapter_dtype`` (default: the model's setting) keeps
        its tensors in float32 over a float16/bfloat16 base."""
        check_new_name(adapter_name, list(self.peft_config))
        if not isinstance(peft_config, PeftConfig):
            raise ConfigError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
        self._check_kind(peft_config)
        if self.peft_config:
            self._check_compatible(peft_config)
        with undo_base_edits_on_error(), adapters_on_meta(low_cpu_mem_usage):  # PiSSA's base edits undone on error
            config = self._create_adapter(adapter_name, peft_config)
        self.peft_config[adapter_name] = config
        self._cast_adapter(adapter_name, self.autocast_adapter_dtype if autocast_adapter_dtype is None
                           else autocast_adapter_dtype)
        if not self._active:
            self._active = [adapter_name]
        self._apply_active()

    def _check_compatible(self, peft_config: PeftConfig) -> None:
        """ConfigError if ``peft_config`` cannot sit beside the adapters already loaded."""
        biased = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if biased or getattr(peft_config, "bias", "none") != "none":
            raise ConfigError(
                "Several adapters cannot be combined with bias != 'none' (biases are shared base parameters); "
                "use bias='none' or one adapter per model."
            )
        first = next(iter(self.peft_config.values()))
        if first.task_type is not None and peft_config.task_type is not None and first.task_type != peft_config.task_type:
            raise ConfigError(f"Adapter task_type {peft_config.task_type} differs from the model's {first.task_type}.")

    def _cast_adapter(self, name: str, autocast: bool) -> None:
        """``autocast``: float16/bfloat16 adapter tensors to float32. Otherwise, as Hugging Face PEFT, the
        adapter takes the dtype of the (floating) base weight it sits on."""
        if not method_for(self.peft_config[name]).autocast_adapter_dtype:
            return  # the adapter's tensors are copies of base modules and keep the base dtype
        for _, layer in self._layers():
            if isinstance(layer, (CopyLayer, ModulesToSaveWrapper)):  # trainable copies of base modules keep their dtype
                continue
            base_dtype = next((p.dtype for p in layer.get_base_layer().parameters() if p.is_floating_point()), None)
            for _, t in layer.adapter_param_items(name):
                if not isinstance(t, nn.Parameter) or not t.dtype.is_floating_point:
                    continue
                if autocast and t.dtype in (torch.float16, torch.bfloat16):
                    t.data = t.data.float()
                elif not autocast and base_dtype is not None and base_dtype.is_floating_point and t.dtype != base_dtype:
                    t.data = t.data.to(base_dtype)
            layer.clear_cache()

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or several names) the active adapter(s); only they train (none with
        ``inference_mode=True``)."""
        names = name_list(adapter_name, "set_adapter")
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name.")
        self._check_active(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"Unknown adapter {unknown[0]!r} (Adapter {unknown[0]} not found.); loaded adapters: "
                                   f"{list(self.peft_config)}.")
        self._active = names
        self._apply_active()
        if inference_mode:
            for p in self.parameters():
                p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and all of its tensors; wrappers left with no adapter are unwrapped."""
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise AdapterNameError(f"Unknown adapter {adapter_name!r} (Adapter {adapter_name} does not exist); loaded "
                                   f"adapters: {list(self.peft_config)}.")
        merged = [k for k, layer in self._layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise PeftkitError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                               f"first. (It is merged in {merged[0]}; call unmerge_adapter().)")
        self._remove_adapter_tensors(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]
        if not self._active and self.peft_config:
            self._active = [next(iter(self.peft_config))]
        self._apply_active()

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Add the active (or given) adapters' deltas into the base weights; forward then costs the base's.

        All or nothing: every layer is checked first (``safe_merge``: its merged weights computed and
        checked for NaN/inf). A weight shared with another module (tied embeddings) is untied first, so
        the other module keeps its values (:mod:`peftkit.core.merging`)."""
        names = list(self._active) if adapter_names is None else name_list(adapter_names, "merge_adapter")
        check_adapter_names(names, list(self.peft_config))
        merge_layers(self.get_base_model(), list(self._layers()), names, safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self._layers():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None, dequantize: bool = False) -> nn.Module:
        """Merge the active (or given) adapters and return the base model with no adapter layers.

        Quantized bases (:mod:`peftkit.quant`): with ``dequantize=True`` every quantized linear first
        becomes an ``nn.Linear`` holding its dequantized weight, so the result is an exact float model;
        otherwise the merged weights are requantized and a PeftkitWarning states the error introduced.
        All or nothing, as :meth:`merge_adapter` (on error the quantized modules are put back too).
        """
        names = list(self._active) if adapter_names is None else name_list(adapter_names, "merge_and_unload")
        check_adapter_names(names, list(self.peft_config))
        model = self.get_base_model()
        if not dequantize:
            merged = unload(model, merge=True, safe_merge=safe_merge, adapter_names=names)
        else:
            check_mergeable(self._layers())  # before dequantizing changes the model
            with dequantized(model):  # put back if the merge fails
                merged = unload(model, merge=True, safe_merge=safe_merge, adapter_names=names)
        requantization_report(merged)
        return merged

    def unload(self) -> nn.Module:
        """Return the base model with every adapter layer removed, without merging."""
        return unload(self.get_base_model(), merge=False)

    # -- running ------------------------------------------------------------------------------
    def _mixed(self, adapter_names: Optional[Sequence[str]], expand: bool = False) -> mixed_batch:
        """The mixed batch of ``adapter_names`` (``expand``: generate() may expand each row into several)."""
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
                raise PeftkitError("adapter_names must be a list with one adapter name per row.")
            check_adapter_names(adapter_names, list(self.peft_config))
        return mixed_batch(adapter_names, expand=expand)

    @signed_by_base  # inspect.signature(model.forward) is the wrapped model's (transformers' Trainer reads it)
    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the model; ``adapter_names`` gives each row its own adapter ("__base__" for none): exactly
        one name per row of the batch."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        mixed = self._mixed(adapter_names)
        first = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None),
                     args[0] if args else None)
        if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] != len(adapter_names):
            raise PeftkitError(f"adapter_names has {len(adapter_names)} entries but the batch has {first.shape[0]} "
                               "rows; give one name per row.")
        with mixed:  # every layer checks that it sees one row per name
            return self.base_model(*args, **kwargs)

    @signed_by_base
    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """``generate`` of the base model; ``adapter_names``: one adapter per input row (beams and
        ``num_return_sequences`` copies of a row use its adapter)."""
        model = self.get_base_model()
        if not hasattr(model, "generate"):
            raise PeftkitError(f"{type(model).__name__} has no generate().")
        with self._mixed(adapter_names, expand=True):
            return model.generate(*args, **kwargs)

    # -- combining ----------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, **_: Any) -> None:
        """A new adapter combining ``adapters`` with ``weights`` (finite numbers), by the method's own
        rule (LoRA: "linear", "cat" or "svd"; see :func:`peftkit.methods.lora.combine.add_weighted_adapter`).
        All or nothing: on any error the new adapter is removed again."""
        adapters = name_list(adapters, "add_weighted_adapter")
        check_adapter_names(adapters, list(self.peft_config))
        check_new_name(adapter_name, list(self.peft_config))
        weights = finite_weights(weights)
        if not adapters or len(adapters) != len(weights):
            raise PeftkitError("add_weighted_adapter needs as many weights as adapters (at least one).")
        types = {str(self.peft_config[a].peft_type) for a in adapters}
        method = lookup(next(iter(types)))
        if len(types) > 1 or method is None or method.combine is None:
            able = sorted(t for t, m in all_methods().items() if m.combine is not None)
            raise PeftkitError(f"add_weighted_adapter combines adapters of one method that supports it ({', '.join(able)}); "
                               f"got {', '.join(sorted(types))}.")
        try:
            method.combine(self, adapters, weights, adapter_name, combination_type=combination_type,
                           svd_rank=svd_rank, svd_clamp=svd_clamp)
        except Exception:
            if adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            raise

    # -- saving and loading -------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Optional[Sequence[str]] = None,
                        save_embedding_layers: Union[str, bool] = "auto", is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Write each selected adapter as a Hugging Face PEFT folder ("default" at the top level,
        others in sub-folders named after them). Every file is written atomically.
        ``save_embedding_layers``: see :func:`peftkit.get_peft_model_state_dict` (base embedding
        weights, saved by ``"auto"`` when targeted or when the vocabulary was resized). Hugging Face
        PEFT's ``path_initial_model_for_weight_conversion`` (PiSSA/OLoRA to LoRA) is not implemented: a
        PeftkitError rather than a folder that silently was not converted."""
        if kwargs.get("path_initial_model_for_weight_conversion") is not None:
            raise PeftkitError("save_pretrained(path_initial_model_for_weight_conversion=...) (converting a PiSSA adapter "
                               "into a LoRA adapter on the original weights) is not implemented in peftkit; save the "
                               "adapter as it is and load it on the PiSSA-modified base model. Nothing was written.")
        names = list(self.peft_config) if selected_adapters is None else name_list(selected_adapters, "selected_adapters")
        check_adapter_names(names, list(self.peft_config))
        save_adapters(self, save_directory, names, safe_serialization=safe_serialization,
                      save_embedding_layers=save_embedding_layers, is_main_process=is_main_process)

    def push_to_hub(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: str = "Upload adapter", selected_adapters: Optional[Sequence[str]] = None,
                    revision: Optional[str] = None) -> Any:
        """Save the adapter(s) to a temporary folder and upload it to ``repo_id`` with huggingface_hub."""
        from .hub import push_folder_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters)
            return push_folder_to_hub(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                                      revision=revision)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                        subfolder: Optional[str] = None, revision: Optional[str] = None,
                        **kwargs: Any) -> "PeftModel":
        """Load an adapter folder (or Hub repo id) onto ``model``, a plain model (not a PeftModel: add
        adapters to one with :meth:`load_adapter`). On any error the model is left unchanged."""
        check_plain_name(adapter_name)
        source, config, weights = read_adapter(model_id, subfolder, revision, is_trainable, config, kwargs)
        check_clean_base(model, config)
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            target_cls = MODEL_TYPE_TO_PEFT_MODEL[str(config.task_type)]
        target_cls = class_for(target_cls, config)
        with undo_base_edits_on_error():  # base weights an init rewrote (PiSSA) are restored on error
            peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
            try:
                set_peft_model_state_dict(peft_model, weights, adapter_name, source=source)
            except Exception:
                peft_model._remove_adapter_tensors(adapter_name)
                raise
        if not is_trainable:
            peft_model.eval()  # as Hugging Face PEFT: a model loaded for inference runs without dropout
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, revision: Optional[str] = None,
                     **kwargs: Any) -> IncompatibleKeys:
        """Load another adapter folder under ``adapter_name`` (not activated); returns the keys not matched
        (``missing_keys`` / ``unexpected_keys``). Nothing changes on error; without ``is_trainable`` the model
        is put in eval mode. An ``adapter_name`` already loaded gets the folder's weights (as Hugging Face
        PEFT, which transformers' Trainer relies on to restore its best checkpoint); its config stays."""
        low_cpu_mem_usage = bool(kwargs.pop("low_cpu_mem_usage", False))
        source, config, weights = read_adapter(model_id, subfolder, revision, is_trainable, None, kwargs)
        if adapter_name in self.peft_config:
            return self._reload_adapter(adapter_name, source, config, weights, is_trainable)
        check_new_name(adapter_name, list(self.peft_config))
        with undo_base_edits_on_error():  # base weights an init rewrote (PiSSA) are restored on error
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
            try:
                result = set_peft_model_state_dict(self, weights, adapter_name, source=source)
            except Exception:
                self.delete_adapter(adapter_name)
                raise
        self._apply_active()
        if not is_trainable:
            self.eval()
        return result


    def _reload_adapter(self, adapter_name: str, source: str, config: PeftConfig, weights: dict,
                        is_trainable: bool) -> IncompatibleKeys:
        if config.peft_type != self.peft_config[adapter_name].peft_type:
            raise ConfigError(f"{source} holds a {config.peft_type} adapter; adapter {adapter_name!r} of this model "
                              f"is {self.peft_config[adapter_name].peft_type}. Load it under another name.")
        result = set_peft_model_state_dict(self, weights, adapter_name, source=source)
        if not is_trainable:
            self.eval()
        return result


class PeftModelForCausalLM(PeftModel):
    """A PeftModel for decoder language models (``TaskType.CAUSAL_LM``)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel for encoder-decoder models (``TaskType.SEQ_2_SEQ_LM``)."""


class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel for sequence classification; the ``classifier``/``score`` head trains in full."""


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel for token classification; the ``classifier``/``score`` head trains in full."""


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel for extractive QA; the ``qa_outputs`` head trains in full."""


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel for encoders producing features (``TaskType.FEATURE_EXTRACTION``)."""


MIXED_COMPATIBLE = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT", "SHIRA")  # Hugging Face PEFT's list


class PeftMixedModel(PeftModel):
    """Hugging Face PEFT's model for adapters of several methods active together
    (``get_peft_model(..., mixed=True)``). Of the methods PEFT can mix, peftkit implements LoRA: so this
    is a PeftModel whose adapters must be LoRA and of which several may be active at once (which a
    PeftModel allows too). Saving, the model card and the status reports are refused, as in PEFT."""

    def _check_kind(self, config: PeftConfig) -> None:
        super()._check_kind(config)
        if str(config.peft_type) not in MIXED_COMPATIBLE:
            raise ConfigError(f"The provided `peft_type` '{config.peft_type}' is not compatible with the "
                              f"`PeftMixedModel`. Compatible types are: {MIXED_COMPATIBLE} (peftkit implements LORA "
                              "of them).")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"Saving is not supported for {type(self).__name__} (as in Hugging Face PEFT); "
                                  "save a PeftModel of the adapters instead.")

    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__}.")

    def get_layer_status(self) -> Any:
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self) -> Any:
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def class_for(cls: type[PeftModel], config: PeftConfig) -> type[PeftModel]:
    """The PeftModel class that runs ``config``: ``cls`` for layer methods, else the method's own
    (``Method.model_class``)."""
    method = method_for(config)
    return method.model_class(cls, config) if method.model_class is not None else cls


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter; returns the PeftModel subclass for ``peft_config.task_type``."""
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
    check_clean_base(model, peft_config)  # a second PeftModel on one base would re-initialise the first one's adapters
    peft_config = copy.deepcopy(peft_config)
    if revision is not None:
        peft_config.revision = revision
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = name_or_path(model)
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(str(peft_config.task_type), PeftModel) if peft_config.task_type else PeftModel
    cls = PeftMixedModel if mixed else class_for(cls, peft_config)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Add adapter layers to ``model`` in place (no PeftModel wrapper); the base is frozen.

    Only the adapter tensors train. Save with :func:`get_peft_model_state_dict`. ``low_cpu_mem_usage``:
    the adapter tensors are created on the meta device, to be loaded (``state_dict``) later.
    """
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
    if not method_for(peft_config).is_layer_method:
        raise ConfigError(f"inject_adapter_in_model supports layer methods only, not {peft_config.peft_type}.")
    check_new_name(adapter_name, [n for _, layer in adapter_layers(model) for n in layer.adapter_names])
    config = prepare_config(peft_config, model)
    with undo_base_edits_on_error():  # base weights an init rewrote (PiSSA) are restored on error
        with adapters_on_meta(low_cpu_mem_usage):
            inject(model, config, adapter_name)
        try:
            if getattr(config, "modules_to_save", None):
                wrap_modules_to_save(model, config.modules_to_save, adapter_name,
                                     optional=TASK_HEADS.get(str(config.task_type), []) if config.task_type else [])
            tie_modules_to_save(model, config, adapter_name)
            wrap_trainable_tokens(model, config, adapter_name)
            if state_dict is not None:
                set_peft_model_state_dict(model, state_dict, adapter_name)
        except Exception:
            remove_adapter(model, adapter_name)
            raise
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.set_adapter([adapter_name], trainable=not config.inference_mode)
    if not isinstance(getattr(model, "peft_config", None), dict):  # as Hugging Face PEFT: the configs ride along
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    return model


__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL",
    "AdapterModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftMixedModel",
    "class_for",
    "get_peft_model",
    "inject_adapter_in_model",
]
