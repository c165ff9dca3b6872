"""PeftModel and its task subclasses, AutoPeftModel*, get_peft_model: the adapter registry and switching.

``PeftModel.base_model`` is an :class:`AdapterModel` whose ``.model`` is the user's model, so that
in-memory keys read ``base_model.model.<module path>...`` exactly as in Hugging Face PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from . import inject as engine
from .checkpoint import (
    adapter_entries,
    get_peft_model_state_dict,
    load_peft_weights,
    save_adapter_folder,
    set_peft_model_state_dict,
    write_model_card,
)
from .config import PeftConfig, TaskType
from .errors import AdapterNameError, ConfigError, PeftkitError, PeftkitWarning, TargetError
from .inject import BASE_ADAPTER, AdapterLayer, ModulesToSaveWrapper

# modules added to modules_to_save automatically, per task type (when present in the model)
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


class AdapterModel(nn.Module):
    """Holds the adapted model as ``.model``; attribute access falls through to it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def _name_or_path(model: nn.Module) -> Optional[str]:
    value = getattr(model, "name_or_path", None)
    if value is None:
        cfg = getattr(model, "config", None)
        value = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return value or None


def _check_new_name(name: Any, existing: Sequence[str]) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        raise AdapterNameError(
            f"Adapter name {name!r} is not valid: use a non-empty string without '.', other than {BASE_ADAPTER!r}."
        )
    if name in existing:
        raise AdapterNameError(f"An adapter named {name!r} already exists; choose another name or delete it first.")


def prepare_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Fill the fields a config takes from the model (default targets, task heads). Returns a copy."""
    from .methods import all_methods, method_for

    config = copy.deepcopy(config)
    method = all_methods().get(str(config.peft_type))  # None for prompt-learning configs
    if method is not None and method.prepare is not None:  # method-specific defaults (may set target_modules)
        method.prepare(config, model)
    own_targets = method is not None and method.find_targets is not None  # the method finds its targets
    if hasattr(config, "target_modules") and config.target_modules is None and not own_targets:
        method = method or method_for(config)  # raises a clear error for an unregistered method
        model_type = engine.model_type_of(model)
        if model_type not in method.default_targets:
            raise ConfigError(
                f"target_modules is not set and peftkit has no default for model type {model_type!r}; pass "
                "target_modules (module names, a regex, or 'all-linear')."
            )
        config.target_modules = list(method.default_targets[model_type])
    heads = TASK_HEADS.get(str(config.task_type)) if config.task_type else None
    if heads and hasattr(config, "modules_to_save"):
        present = [h for h in heads if any(k == h or k.endswith("." + h) for k, _ in model.named_modules())]
        if present:
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(present))
    return config


class PeftModel(nn.Module):
    """A model with named adapters. Use :func:`get_peft_model` or :meth:`from_pretrained` to build one.

    Args:
        model: the base model (changed in place: targeted modules are wrapped).
        peft_config: the config of the first adapter.
        adapter_name: its name.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        if peft_config.is_prompt_learning:
            raise ConfigError(f"{peft_config.peft_type} is a prompt-learning method, which this PeftModel does not run.")
        _check_new_name(adapter_name, [])
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.base_model = AdapterModel(model)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

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
        return self.base_model.model

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
        return self.peft_config[self._active[0]]

    def _layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return engine.adapter_layers(self.base_model.model)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (inactive unless it is the first); the model is unchanged on error."""
        _check_new_name(adapter_name, list(self.peft_config))
        if not isinstance(peft_config, PeftConfig):
            raise ConfigError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
        if peft_config.is_prompt_learning:
            raise ConfigError("Prompt-learning adapters cannot be added to a layer-method PeftModel.")
        if self.peft_config:
            biased = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
            if biased or getattr(peft_config, "bias", "none") != "none":
                raise ConfigError(
                    "Several adapters cannot be combined with bias != 'none' (biases are shared base parameters); "
                    "use bias='none' or one adapter per model."
                )
            first = next(iter(self.peft_config.values()))
            if first.task_type is not None and peft_config.task_type is not None and first.task_type != peft_config.task_type:
                raise ConfigError(f"Adapter task_type {peft_config.task_type} differs from the model's {first.task_type}.")
        model = self.base_model.model
        config = prepare_config(peft_config, model)
        engine.inject(model, config, adapter_name)
        try:
            if getattr(config, "modules_to_save", None):
                # task heads are optional: HF PEFT writes every head name of the task type
                # (e.g. ["classifier", "score"] for SEQ_CLS) although a model has only one of them
                heads = TASK_HEADS.get(str(config.task_type), []) if config.task_type else []
                user = set(peft_config.modules_to_save or []) - set(heads)
                found = engine.add_modules_to_save(model, config.modules_to_save, adapter_name)
                missing = [m for m in user if not any(k == m or k.endswith("." + m) for k in found)]
                if missing:
                    raise TargetError(f"modules_to_save {missing} match no module of the model.")
        except Exception:
            self._remove_adapter_tensors(adapter_name)
            raise
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = _name_or_path(model)
        self.peft_config[adapter_name] = config
        if self.autocast_adapter_dtype:
            self._upcast_adapter(adapter_name)
        if not self._active:
            self._active = [adapter_name]
        self._apply_active()

    def _upcast_adapter(self, name: str) -> None:
        from .methods import all_methods

        method = all_methods().get(str(self.peft_config[name].peft_type))
        if method is not None and not method.autocast_adapter_dtype:
            return  # the adapter's tensors are copies of base modules and keep the base dtype
        for _, _, t in adapter_entries(self.base_model.model, name):
            if t.dtype in (torch.float16, torch.bfloat16) and isinstance(t, nn.Parameter):
                t.data = t.data.float()

    def _remove_adapter_tensors(self, name: str) -> None:
        model = self.base_model.model
        for key, layer in reversed(list(self._layers())):  # innermost first
            if name in layer.adapter_names:
                layer.delete_adapter(name)
                if not layer.adapter_names:
                    parent, child = engine.get_submodule_parent(model, key)
                    setattr(parent, child, layer.base_layer)

    def _apply_active(self) -> None:
        """Activate ``self._active`` in every layer and set requires_grad (only active adapters train)."""
        for p in self.base_model.model.parameters():
            p.requires_grad_(False)
        for _, layer in self._layers():
            trainable = any(not self.peft_config[n].inference_mode for n in self._active if n in layer.adapter_names)
            layer.set_adapter(self._active, trainable=trainable)
        for name in self._active:
            config = self.peft_config[name]
            if config.inference_mode:
                continue
            bias = getattr(config, "bias", "none")
            for mem_key, _, tensor in adapter_entries(self.base_model.model, name, bias):
                if isinstance(tensor, nn.Parameter) and ("bias" in mem_key.rsplit(".", 1)[-1]) and bias != "none":
                    tensor.requires_grad_(True)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_name`` (or several names) the active adapter(s); only they train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name.")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"Unknown adapter {unknown[0]!r}; loaded adapters: {list(self.peft_config)}.")
        self._active = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and all of its tensors; wrappers left with no adapter are unwrapped."""
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"Unknown adapter {adapter_name!r}; loaded adapters: {list(self.peft_config)}.")
        merged = [k for k, layer in self._layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise PeftkitError(f"Adapter {adapter_name!r} is merged (e.g. in {merged[0]}); unmerge_adapter() first.")
        self._forget_adapter(adapter_name)

    def _forget_adapter(self, adapter_name: str) -> None:
        """Drop a (known, unmerged) adapter's tensors and config; the first remaining one becomes active
        if no active adapter is left."""
        self._remove_adapter_tensors(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]
        if not self._active and self.peft_config:
            self._active = [next(iter(self.peft_config))]
        self._apply_active()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the context the model computes its base output (merged adapters are unmerged)."""
        layers = [layer for _, layer in self._layers()]
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Add the active (or given) adapters' deltas into the base weights; forward then costs the base's."""
        names = self._active if adapter_names is None else list(adapter_names)
        engine.check_adapter_names(names, list(self.peft_config))
        layers = [(k, layer) for k, layer in self._layers() if not isinstance(layer, ModulesToSaveWrapper)]
        for key, layer in layers:
            if not layer.mergeable and any(n in layer.adapter_names for n in names):
                raise PeftkitError(f"{key}: {type(layer).__name__} adapters cannot be merged.{layer.merge_hint}")
        for _, layer in layers:
            layer.merge(names, safe_merge=safe_merge)

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
        """
        from . import quant

        names = self._active if adapter_names is None else list(adapter_names)
        engine.check_adapter_names(names, list(self.peft_config))
        model = self.base_model.model
        if dequantize:
            engine.check_mergeable(self._layers())  # before dequantize_model changes the model
            quant.dequantize_model(model)
        merged = engine.unload(model, merge=True, safe_merge=safe_merge, adapter_names=names)
        quant.requantization_report(merged)
        return merged

    def unload(self) -> nn.Module:
        """Return the base model with every adapter layer removed, without merging."""
        return engine.unload(self.base_model.model, merge=False)

    # -- running ------------------------------------------------------------------------------
    def _mixed(self, adapter_names: Optional[Sequence[str]]) -> engine.mixed_batch:
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
                raise PeftkitError("adapter_names must be a list with one adapter name per row.")
            engine.check_adapter_names(adapter_names, list(self.peft_config))
        return engine.mixed_batch(adapter_names)

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the model; ``adapter_names`` gives each row its own adapter ("__base__" for none)."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        model = self.base_model.model
        if not hasattr(model, "generate"):
            raise PeftkitError(f"{type(model).__name__} has no generate().")
        with self._mixed(adapter_names):
            return model.generate(*args, **kwargs)

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # -- combining ----------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, **_: Any) -> None:
        """A new LoRA adapter combining ``adapters`` with ``weights`` ("linear", "cat" or "svd").

        "cat" is exact (rank = sum of ranks); "svd" is the best approximation of Σ wᵢ·ΔWᵢ at rank
        ``svd_rank`` (default: the largest rank); "linear" sums the scaled A and B factors (equal
        ranks only, as Hugging Face PEFT; not exactly Σ wᵢ·ΔWᵢ).
        """
        from .methods.lora import LoraConfig, LoraLayer, combine_layer

        engine.check_adapter_names(list(adapters), list(self.peft_config))
        _check_new_name(adapter_name, list(self.peft_config))
        if not adapters or len(adapters) != len(weights):
            raise PeftkitError("add_weighted_adapter needs as many weights as adapters (at least one).")
        if combination_type not in ("linear", "cat", "svd"):
            raise PeftkitError(f"combination_type {combination_type!r} is not supported; use 'linear', 'cat' or 'svd'.")
        configs = [self.peft_config[a] for a in adapters]
        if not all(isinstance(c, LoraConfig) for c in configs):
            raise PeftkitError("add_weighted_adapter combines LoRA adapters only.")
        if any(c.use_dora for c in configs):
            raise PeftkitError("add_weighted_adapter does not combine DoRA adapters (their magnitudes do not add).")
        if any(c.modules_to_save for c in configs):
            raise PeftkitError("add_weighted_adapter cannot combine adapters with modules_to_save.")
        if svd_rank is not None and svd_rank <= 0:
            raise PeftkitError(f"svd_rank must be > 0, got {svd_rank}.")
        ranks: dict[str, int] = {}
        for key, layer in self._layers():
            if not isinstance(layer, LoraLayer):
                continue
            rs = [layer.r[a] for a in adapters if a in layer.r]
            if not rs:
                continue
            if combination_type == "linear" and len(set(rs)) > 1:
                raise PeftkitError(f"'linear' needs adapters of equal rank; {key} has ranks {rs}. Use 'cat' or 'svd'.")
            ranks[key] = sum(rs) if combination_type == "cat" else (svd_rank or max(rs)) if combination_type == "svd" else rs[0]
        r = max(ranks.values())
        pattern = {k: v for k, v in ranks.items() if v != r}
        new_config = configs[0].replace(
            r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
            layers_to_transform=None, layers_pattern=None, exclude_modules=None, use_rslora=False,
            init_lora_weights=False, lora_bias=False,
        )
        self.add_adapter(adapter_name, new_config)
        for key, layer in self._layers():
            if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                combine_layer(layer, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp)
                layer._clear_cache()

    # -- saving and loading -------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Optional[Sequence[str]] = None,
                        save_embedding_layers: Union[str, bool] = "auto", is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Write each selected adapter as a Hugging Face PEFT folder ("default" at the top level,
        others in sub-folders named after them). Every file is written atomically.
        ``save_embedding_layers``: see :func:`peftkit.get_peft_model_state_dict` (base embedding
        weights, saved by ``"auto"`` when targeted or when the vocabulary was resized)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise PeftkitError(f"{save_directory} is a file; save_pretrained needs a directory.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        engine.check_adapter_names(names, list(self.peft_config))
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        for name in names:
            config = self.peft_config[name]
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            tensors = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            overrides = {}
            if config.task_type is None:
                base = self.get_base_model()
                overrides["auto_mapping"] = {"base_model_class": type(base).__name__,
                                             "parent_library": type(base).__module__}
            save_adapter_folder(folder, config, tensors, safe_serialization=safe_serialization,
                                extra_files=self._extra_files(name), config_overrides=overrides)
        first = self.peft_config[names[0]] if names else None
        if first is not None:  # one model card, at the top (as Hugging Face PEFT)
            write_model_card(save_directory, first.base_model_name_or_path, str(first.peft_type),
                             str(first.task_type) if first.task_type else None)

    def _extra_files(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """Additional safetensors files saved beside the compatible one (used by prompt methods)."""
        return {}

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
        """Load an adapter folder (or Hub repo id) onto ``model``. On any error the model is left unchanged."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **kwargs)
        config = copy.deepcopy(config)
        config.inference_mode = not is_trainable
        weights = load_peft_weights(model_id, subfolder=subfolder, revision=revision, **kwargs)
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            target_cls = MODEL_TYPE_TO_PEFT_MODEL[str(config.task_type)]
        target_cls = target_cls._class_for(config)
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name, source=os.fspath(model_id))
        except Exception:
            peft_model._remove_adapter_tensors(adapter_name)
            raise
        return peft_model

    @classmethod
    def _class_for(cls, config: PeftConfig) -> type["PeftModel"]:
        """Hook for methods whose PeftModel differs (prompt learning); layer methods use ``cls``."""
        if config.is_prompt_learning:
            from .prompt_model import prompt_model_class

            return prompt_model_class(cls, config)
        return cls

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, revision: Optional[str] = None, **kwargs: Any) -> None:
        """Load another adapter folder under ``adapter_name`` (not activated). Nothing changes on error."""
        _check_new_name(adapter_name, list(self.peft_config))
        config = copy.deepcopy(PeftConfig.from_pretrained(model_id, subfolder=subfolder, revision=revision, **kwargs))
        config.inference_mode = not is_trainable
        weights = load_peft_weights(model_id, subfolder=subfolder, revision=revision, **kwargs)
        self.add_adapter(adapter_name, config)
        try:
            set_peft_model_state_dict(self, weights, adapter_name, source=os.fspath(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._apply_active()


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


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter; returns the PeftModel subclass for ``peft_config.task_type``."""
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
    if mixed:
        raise PeftkitError("mixed=True (PeftMixedModel) is not supported; several adapters of one method coexist in a PeftModel.")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn("The model already has adapter layers; call get_peft_model on a clean model or use add_adapter.",
                      PeftkitWarning, stacklevel=2)
    peft_config = copy.deepcopy(peft_config)
    if revision is not None:
        peft_config.revision = revision
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = _name_or_path(model)
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(str(peft_config.task_type), PeftModel) if peft_config.task_type else PeftModel
    cls = cls._class_for(peft_config)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Add adapter layers to ``model`` in place (no PeftModel wrapper); the base is frozen.

    Only the adapter tensors train. Save with :func:`get_peft_model_state_dict`.
    """
    if peft_config.is_prompt_learning:
        raise ConfigError("inject_adapter_in_model does not support prompt-learning methods.")
    config = prepare_config(peft_config, model)
    engine.inject(model, config, adapter_name)
    if getattr(config, "modules_to_save", None):
        engine.add_modules_to_save(model, config.modules_to_save, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in engine.adapter_layers(model):
        layer.set_adapter([adapter_name], trainable=not config.inference_mode)
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict, adapter_name)
    return model


# ---------------------------------------------------------------------------------------------
# AutoPeftModel


class AutoPeftModel:
    """Load an adapter folder together with its base model (from ``base_model_name_or_path``)."""

    _target_class: Optional[str] = None  # transformers Auto class name
    _peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise PeftkitError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(...).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, **kwargs: Any) -> PeftModel:
        import transformers

        hub_keys = ("cache_dir", "token", "local_files_only", "subfolder")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in hub_keys}
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise PeftkitError(
                f"{pretrained_model_name_or_path}: adapter_config.json has no base_model_name_or_path; load the base "
                "model yourself and use PeftModel.from_pretrained(model, path)."
            )
        target = cls._target_class
        task = str(peft_config.task_type) if peft_config.task_type else None
        if target is None:
            target = _TASK_TO_AUTO.get(task, "AutoModel") if task else None
            if target is None:
                mapping = peft_config.auto_mapping or {}
                base_cls_name = mapping.get("base_model_class")
                parent = mapping.get("parent_library", "")
                if not base_cls_name or not parent.startswith("transformers"):
                    raise PeftkitError("The adapter has no task_type and no transformers base class to load; "
                                       "load the base model yourself and use PeftModel.from_pretrained.")
                target = base_cls_name
        elif task is not None and _TASK_TO_AUTO.get(task) not in (None, target):
            raise PeftkitError(f"The adapter's task_type is {task}; load it with the matching AutoPeftModel class "
                               f"(it needs {_TASK_TO_AUTO[task]}, not {target}).")
        auto_cls = getattr(transformers, target)
        try:
            base = auto_cls.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        except OSError as exc:
            raise PeftkitError(f"Could not load the base model {base_path!r}: {exc}") from None
        return cls._peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                               is_trainable=is_trainable, config=peft_config, revision=revision,
                                               **hub_kwargs)


_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def auto_class_for(task_type: Any, default: str = "CAUSAL_LM") -> Any:
    """The transformers Auto class that builds a model for ``task_type`` (``default``'s when the
    task is None or has no Auto class)."""
    import transformers

    name = _TASK_TO_AUTO.get(str(task_type)) if task_type is not None else None
    return getattr(transformers, name or _TASK_TO_AUTO[default])


class AutoPeftModelForCausalLM(AutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _target_class = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
