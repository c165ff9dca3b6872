"""The prompt-learning PeftModels: prompt tuning, P-tuning, prefix tuning / P-tuning v2.

The in-memory structure is Hugging Face PEFT's: ``base_model`` is the user's model itself (no
wrapper), ``prompt_encoder`` a ModuleDict of encoders keyed by adapter name, classifier heads wrapped
in ``ModulesToSaveWrapper``. A :class:`PromptLearningModel` is a :class:`~peftkit.PeftModel` that
fills its hooks (how an adapter is created, removed, activated) for virtual tokens instead of layers;
the rest (names, switching, deleting, disabling, saving, loading) is PeftModel's. Running lives in
:mod:`.running`, the virtual tokens in :mod:`.virtual`, their saved state in :mod:`.state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..config import TASK_HEADS, PeftConfig, PromptLearningConfig, TaskType
from ..core.inject import prepare_config
from ..core.modules_to_save import ModulesToSaveWrapper, remove_modules_to_save, wrap_modules_to_save
from ..errors import ConfigError, MergeError, PeftkitError
from ..model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from ..registry import method_for
from . import running
from .introspect import is_causal
from .nearest import NearestToken, nearest_tokens
from .sizes import fill_sizes
from .virtual import build_virtual, encoded_output, make_cache


class PromptLearningModel(PeftModel):
    """A model with soft-prompt adapters (prompt tuning, P-tuning, prefix tuning / P-tuning v2).

    Build it with :func:`peftkit.get_peft_model` or :meth:`PeftModel.from_pretrained`. Several
    adapters can be loaded; :meth:`set_adapter` picks the one that runs; ``adapter_names=[...]`` in
    :meth:`forward` / :meth:`generate` gives each row its own (``"__base__"`` for none).
    """

    task: str = ""

    # -- PeftModel's hooks ----------------------------------------------------------------------
    def _wrap_base(self, model: nn.Module, peft_config: PeftConfig) -> nn.Module:
        """``base_model`` is the model itself; the encoders sit beside it in ``prompt_encoder``."""
        self.is_causal = is_causal(model)
        self.prompt_encoder = nn.ModuleDict()
        return model

    def _check_kind(self, config: PeftConfig) -> None:
        if not isinstance(config, PromptLearningConfig):
            raise ConfigError(f"A {config.peft_type} adapter cannot be added to a prompt-learning model; wrap a "
                              "separate model for layer methods.")

    def _create_adapter(self, adapter_name: str, peft_config: PeftConfig) -> PeftConfig:
        config = self._prepare(peft_config)
        if config.uses_kv_prefix and running.gradient_checkpointing(self.base_model):
            raise PeftkitError(running.GC_MESSAGE)
        # loaded for inference, an encoder holds its output only (as Hugging Face PEFT builds it)
        encoder = method_for(config).make_encoder(config, self.input_embeddings(), bool(config.inference_mode))
        encoder = encoder.to(running.prompt_device(self))
        if self.autocast_adapter_dtype and encoder.embedding.weight.dtype in (torch.float16, torch.bfloat16):
            encoder = encoder.float()
        wrap_modules_to_save(self.base_model, config.modules_to_save, adapter_name, optional=TASK_HEADS.get(self.task, []))
        self.prompt_encoder[adapter_name] = encoder
        return config

    def _upcast_adapter(self, name: str) -> None:
        """The encoder is kept in float32 by :meth:`_create_adapter`; head copies keep the base dtype."""

    def _remove_adapter_tensors(self, name: str) -> None:
        remove_modules_to_save(self.base_model, name)
        if name in self.prompt_encoder:
            del self.prompt_encoder[name]

    def _apply_active(self) -> None:
        """Freeze the base model; only the active adapter's encoder and heads train."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name in self._active and not self.peft_config[name].inference_mode)
        trainable = any(not self.peft_config[n].inference_mode for n in self._active)
        for _, layer in self._layers():
            layer.set_adapter(self._active, trainable=trainable)

    def _check_active(self, names: list[str]) -> None:
        if len(names) != 1:
            raise PeftkitError("Exactly one soft-prompt adapter is active at a time; to run several at once give each "
                               "row its own with adapter_names=[...].")

    def _prepare(self, config: PromptLearningConfig) -> PromptLearningConfig:
        """A copy of ``config`` with the model-derived fields filled (as Hugging Face PEFT), checked."""
        config = prepare_config(config, self.base_model)  # copy; adds classifier heads to modules_to_save
        if config.task_type is None:
            config.task_type = TaskType(self.task)
        elif str(config.task_type) != self.task:
            raise ConfigError(f"The adapter's task_type is {config.task_type} but this is a {self.task} model.")
        config.validate()  # again, with the task known (and fields set after the config was built)
        return fill_sizes(self.base_model, self.task, config, self.input_embeddings())

    # -- structure ------------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def word_embeddings(self) -> nn.Module:
        """The model's input embedding layer (where virtual tokens live for input prompts)."""
        emb = self.input_embeddings()
        if emb is None:
            raise PeftkitError(f"{type(self.base_model).__name__} has no input embeddings (get_input_embeddings()).")
        return emb

    def input_embeddings(self) -> Optional[nn.Module]:
        """The model's input embedding layer (the active copy if it is a trained head), or None."""
        get = getattr(self.base_model, "get_input_embeddings", None)
        if not callable(get):
            return None
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            return None
        if isinstance(emb, ModulesToSaveWrapper):
            emb = emb.active_module()
        return emb if isinstance(getattr(emb, "weight", None), torch.Tensor) else None

    # -- what cannot be done with soft prompts ---------------------------------------------------
    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise MergeError("Soft prompts cannot be merged into the model weights: they are extra tokens, not weight "
                         "deltas.")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise MergeError("Soft prompts cannot be merged into the model weights; use unload() to get the base model.")

    # -- the virtual tokens --------------------------------------------------------------------
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The saved ``prompt_embeddings`` (Hugging Face name): the encoder output for every virtual token."""
        return encoded_output(self.prompt_encoder[adapter_name]).detach().cpu()

    def get_prompt(self, batch_size: int) -> Any:
        """The active adapter's virtual tokens for ``batch_size`` rows (Hugging Face name): prompts
        ``(batch, n, token_dim)`` for input methods, a transformers Cache for prefix tuning."""
        v = build_virtual(self, [self._active[0]] * batch_size, running.prompt_device(self), running.prompt_dtype(self))
        return make_cache(self.base_model, self.task, v.kv) if v.kv is not None else v.embeds

    def nearest_tokens(self, adapter_name: Optional[str] = None, k: int = 5, tokenizer: Any = None
                       ) -> list[list[NearestToken]]:
        """For each virtual token of an input-prompt adapter, the ``k`` vocabulary tokens whose input
        embeddings are nearest by cosine similarity, best first (see :func:`.nearest.nearest_tokens`)."""
        return nearest_tokens(self, adapter_name, k, tokenizer)

    # -- running --------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the model with the virtual tokens of the active adapter, or of ``adapter_names[i]`` for row ``i``."""
        if self._disabled:
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                     "labels": labels}
            return self.base_model(**{k: t for k, t in given.items() if t is not None}, **kwargs)
        return running.forward(self, input_ids, attention_mask, inputs_embeds, labels, adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """``generate`` with the active adapter's virtual tokens, or ``adapter_names[i]``'s for row ``i``."""
        base = self.base_model
        if not hasattr(base, "generate"):
            raise PeftkitError(f"{type(base).__name__} has no generate().")
        if self._disabled:
            return base.generate(*args, **kwargs)
        return running.generate(self, *args, adapter_names=adapter_names, **kwargs)


class PromptModelForCausalLM(PromptLearningModel, PeftModelForCausalLM):
    """Soft prompts for decoder language models: virtual tokens before the text, masked from the loss."""

    task = "CAUSAL_LM"


class PromptModelForSeq2SeqLM(PromptLearningModel, PeftModelForSeq2SeqLM):
    """Soft prompts for encoder-decoder models: input prompts on the encoder, prefixes on the decoder's
    self-attention (as Hugging Face PEFT) and, with ``encoder_prefix=True``, on the encoder's too."""

    task = "SEQ_2_SEQ_LM"


class PromptModelForSequenceClassification(PromptLearningModel, PeftModelForSequenceClassification):
    """Soft prompts for sequence classification; the ``classifier``/``score`` head trains in full."""

    task = "SEQ_CLS"


class PromptModelForTokenClassification(PromptLearningModel, PeftModelForTokenClassification):
    """Soft prompts for token classification; the head trains in full. Outputs include the virtual
    positions (labels are extended with -100)."""

    task = "TOKEN_CLS"


class PromptModelForFeatureExtraction(PromptLearningModel, PeftModelForFeatureExtraction):
    """Soft prompts for encoders producing features; outputs include the virtual positions."""

    task = "FEATURE_EXTRACTION"


PROMPT_MODEL_CLASSES: dict[str, type[PromptLearningModel]] = {
    "CAUSAL_LM": PromptModelForCausalLM,
    "SEQ_2_SEQ_LM": PromptModelForSeq2SeqLM,
    "SEQ_CLS": PromptModelForSequenceClassification,
    "TOKEN_CLS": PromptModelForTokenClassification,
    "FEATURE_EXTRACTION": PromptModelForFeatureExtraction,
}


def prompt_model_class(cls: type[PeftModel], config: PeftConfig) -> type[PeftModel]:
    """The prompt-learning PeftModel class for ``cls`` (a task class or PeftModel) and ``config``
    (the registry's ``Method.model_class`` of the soft-prompt methods)."""
    if isinstance(cls, type) and issubclass(cls, PromptLearningModel):
        return cls
    for prompt_cls in PROMPT_MODEL_CLASSES.values():
        if cls is not PeftModel and issubclass(prompt_cls, cls):
            return prompt_cls
    task = str(config.task_type) if config.task_type is not None else None
    if task in PROMPT_MODEL_CLASSES:
        return PROMPT_MODEL_CLASSES[task]
    raise ConfigError(
        f"{config.peft_type} needs task_type set to one of {', '.join(PROMPT_MODEL_CLASSES)} (got {config.task_type}); "
        "it decides where the virtual tokens go."
    )


__all__ = [
    "PROMPT_MODEL_CLASSES",
    "PromptLearningModel",
    "PromptModelForCausalLM",
    "PromptModelForFeatureExtraction",
    "PromptModelForSeq2SeqLM",
    "PromptModelForSequenceClassification",
    "PromptModelForTokenClassification",
    "prompt_model_class",
]
