"""Soft-prompt methods: prompt tuning, P-tuning (v1), prefix tuning and P-tuning v2.

These methods add no layer to the model. They learn ``n`` *virtual tokens* that the prompt-learning
PeftModel (:mod:`peftkit.prompt_model`) puts in front of every sequence:

* **prompt tuning** (Lester et al., 2021): ``P ∈ R^{n×d}`` is a free parameter (``d`` = the model's
  embedding size). The model reads ``[P; E(x)]`` instead of ``E(x)``.
* **P-tuning v1** (Liu et al., 2021): ``P = f(E_v)`` where ``E_v ∈ R^{n×d}`` is free and ``f`` is a
  reparameterization encoder: ``MLP: Linear(d,h) → ReLU → Linear(h,h) → ReLU → Linear(h,d)`` or
  ``LSTM: BiLSTM(d, h, layers) → Linear(2h,2h) → ReLU → Linear(2h,d)``. Inputs are used as for
  prompt tuning.
* **prefix tuning** (Li & Liang, 2021): every attention layer ``l`` gets ``n`` extra keys and values
  ``K_l, V_l ∈ R^{heads_kv×n×head_dim}``, prepended to the layer's own through the transformers
  ``Cache`` API. All layers' prefixes are one matrix ``Z ∈ R^{n × (2·L·heads_kv·head_dim)}``:
  free (``prefix_projection=False``) or ``Z = W₂·tanh(W₁·E_v + b₁) + b₂`` (``prefix_projection=True``,
  the MLP reparameterization of the paper, ``E_v ∈ R^{n×td}``).
* **P-tuning v2** (Liu et al., 2022, "deep prompt tuning") is prefix tuning without the
  reparameterization: free key/value prompts on every layer. :func:`p_tuning_v2_config` builds it.

Configs follow Hugging Face PEFT 0.21 field for field (``adapter_config.json`` is interchangeable).
The fields ``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules`` and
``encoder_hidden_size`` are filled from the model when left ``None``; for grouped-query attention
models prefix tuning uses ``token_dim = num_kv_heads·head_dim`` and ``num_attention_heads =
num_kv_heads`` (the shape of the model's keys and values).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import PeftConfig, PeftType, TaskType, positive_int, probability, register_config
from ..errors import ConfigError, PeftkitWarning

# Task types a prompt-learning adapter can serve.
PROMPT_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning initialises its virtual tokens."""

    TEXT = "TEXT"  # the embeddings of a text's tokens (repeated / truncated to the prompt length)
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the embeddings of tokens sampled uniformly from the vocabulary
    RANDOM = "RANDOM"  # N(0, 1), the nn.Embedding default

    def __str__(self) -> str:
        return self.value


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The P-tuning encoder."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


def _enum(config: PeftConfig, name: str, enum_cls: type[enum.Enum]) -> None:
    value = getattr(config, name)
    try:
        setattr(config, name, enum_cls(str(value)))
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}.") from None


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the soft-prompt methods (Hugging Face ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: the prompt length ``n`` (required, > 0).
        token_dim: the width of a virtual token; filled from the model (its hidden size; for prefix
            tuning ``num_kv_heads·head_dim``).
        num_transformer_submodules: 2 for ``SEQ_2_SEQ_LM``, else 1 (filled from ``task_type``).
        num_attention_heads: attention heads (key/value heads for prefix tuning on GQA models).
        num_layers: transformer layers (decoder layers for encoder-decoder prefix tuning).
        modules_to_save: modules trained in full beside the prompt; ``classifier``/``score`` are added
            for ``SEQ_CLS`` and ``TOKEN_CLS``.
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def validate(self) -> None:
        name = type(self).__name__
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{name}.num_virtual_tokens is required: the number of virtual tokens (an integer > 0).")
        positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        for field_name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None:
                positive_int(self, field_name, value)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"{name}.num_transformer_submodules must be 1, 2 or None, got "
                              f"{self.num_transformer_submodules!r}.")
        if self.task_type is not None and str(self.task_type) not in PROMPT_TASKS:
            raise ConfigError(f"{name}: task_type {self.task_type} is not supported by prompt-learning methods; use "
                              f"one of {', '.join(PROMPT_TASKS)}.")

    @property
    def uses_kv_prefix(self) -> bool:
        """True for methods that act on attention keys/values (prefix tuning), False for input prompts."""
        return False


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``n`` free virtual-token embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``RANDOM`` (N(0,1)), ``SAMPLE_VOCAB`` (embeddings of random vocabulary
            tokens) or ``TEXT`` (embeddings of ``prompt_tuning_init_text``'s tokens, repeated or
            truncated to the prompt length).
        prompt_tuning_init_text: the text for ``TEXT`` init.
        tokenizer_name_or_path: a tokenizer (a local folder works) for ``TEXT`` init.
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (``trust_remote_code`` is
            dropped: loading never executes code).
    """

    PEFT_TYPE = PeftType.PROMPT_TUNING

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def validate(self) -> None:
        super().validate()
        _enum(self, "prompt_tuning_init", PromptTuningInit)
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a "
                                  "tokenizer name or a local tokenizer folder).")
            if self.prompt_tuning_init_text is None or not self.prompt_tuning_init_text.strip():
                raise ConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs a non-empty "
                                  "prompt_tuning_init_text.")
        elif self.tokenizer_kwargs:
            raise ConfigError("PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT'.")


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning v1: virtual tokens produced by an MLP or bidirectional-LSTM encoder.

    Args:
        encoder_reparameterization_type: ``MLP`` or ``LSTM``.
        encoder_hidden_size: the encoder's hidden size ``h`` (default: ``token_dim``).
        encoder_num_layers: LSTM layers. The MLP always has 3 linear layers (as in Hugging Face
            PEFT; another value warns and is ignored).
        encoder_dropout: dropout between LSTM layers.
    """

    PEFT_TYPE = PeftType.P_TUNING

    encoder_reparameterization_type: Union[PromptEncoderReparameterizationType, str] = \
        PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        _enum(self, "encoder_reparameterization_type", PromptEncoderReparameterizationType)
        if self.encoder_hidden_size is not None:
            positive_int(self, "encoder_hidden_size", self.encoder_hidden_size)
        positive_int(self, "encoder_num_layers", self.encoder_num_layers)
        probability(self, "encoder_dropout", self.encoder_dropout)


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: per-layer key/value prefixes (P-tuning v2 when ``prefix_projection=False``).

    Args:
        encoder_hidden_size: the hidden size of the projection MLP (default: ``token_dim``).
        prefix_projection: learn the prefixes through ``Linear → tanh → Linear`` from ``n``
            ``token_dim``-sized embeddings (the prefix-tuning paper's reparameterization) instead
            of directly.
        init_weights: ``"zero"`` starts from all-zero prefixes (last projection layer zeroed);
            ``None`` is the default random init.
        encoder_prefix: encoder-decoder models (T5, BART) only. ``False`` (the default, as Hugging
            Face PEFT): prefixes on the decoder's self-attention. ``True`` (a peftkit extension, the
            prefix-tuning paper's encoder-decoder setup): every encoder self-attention layer gets a
            prefix too. Encoder layer ``j`` reads stored pair ``(2j+1) mod num_layers``, which Hugging
            Face PEFT computes for decoder layer ``j``'s cross-attention and then drops, so the saved
            tensor keeps its shape. The field is written to ``adapter_config.json`` only when true;
            Hugging Face PEFT loads such a folder with a warning about the unknown field and runs
            its prefixes on the decoder only.
    """

    PEFT_TYPE = PeftType.PREFIX_TUNING

    encoder_prefix: bool = False
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None:
            positive_int(self, "encoder_hidden_size", self.encoder_hidden_size)
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}.")
        if self.encoder_prefix and self.task_type is not None and str(self.task_type) != "SEQ_2_SEQ_LM":
            raise ConfigError(
                f"encoder_prefix=True is for encoder-decoder models (task_type SEQ_2_SEQ_LM); a {self.task_type} "
                "model already gets prefixes on every attention layer. Leave encoder_prefix unset."
            )

    @property
    def uses_kv_prefix(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not out["encoder_prefix"]:  # peftkit-only field: default folders stay byte-compatible
            del out["encoder_prefix"]
        return out


def p_tuning_v2_config(num_virtual_tokens: int, task_type: Union[TaskType, str, None] = None,
                       **kwargs: Any) -> PrefixTuningConfig:
    """P-tuning v2 ("deep prompt tuning"): trainable key/value prompts on every layer, no
    reparameterization. It is prefix tuning with ``prefix_projection=False``, saved as such."""
    if kwargs.get("prefix_projection"):
        raise ConfigError("P-tuning v2 has no prefix projection; use PrefixTuningConfig(prefix_projection=True) for "
                          "the reparameterized prefix tuning.")
    kwargs["prefix_projection"] = False
    return PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type, **kwargs)


# ---------------------------------------------------------------------------------------------
# encoders (in-memory structure and parameter names as Hugging Face PEFT)


class PromptEmbedding(nn.Module):
    """Prompt tuning: ``P = embedding.weight``, shape ``(n·submodules, token_dim)``."""

    reparameterized = False

    def __init__(self, total_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(total_tokens, token_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PromptEncoder(nn.Module):
    """P-tuning: ``P = head(embedding.weight)`` (see the module docstring for the heads).

    With ``encoded=True`` (an adapter loaded for inference, as Hugging Face PEFT does) only
    ``embedding`` exists and holds the encoder's output.
    """

    def __init__(self, config: PromptEncoderConfig, total_tokens: int, encoded: bool = False) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.encoder_type = PromptEncoderReparameterizationType(str(config.encoder_reparameterization_type))
        self.embedding = nn.Embedding(total_tokens, d)
        self.reparameterized = not encoded
        if encoded:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("PromptEncoderConfig.encoder_num_layers is ignored by the MLP encoder, which always has "
                              "3 linear layers (as in Hugging Face PEFT).", PeftkitWarning, stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` (batch, n) -> prompts (batch, n, token_dim)."""
        x = self.embedding(indices)
        if not self.reparameterized:
            return x
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning: ``Z = embedding.weight`` of shape ``(n, 2·L·token_dim)``, or with
    ``prefix_projection`` ``Z = transform(embedding.weight)`` with ``embedding`` ``(n, token_dim)``.

    Row ``t`` of ``Z`` viewed as ``(2·L, heads, head_dim)`` holds the key (``2l``) and value
    (``2l+1``) of virtual token ``t`` for layer ``l``. ``encoded=True`` keeps only ``embedding``
    holding ``Z`` (an adapter loaded for inference, as Hugging Face PEFT does).
    """

    def __init__(self, config: PrefixTuningConfig, encoded: bool = False) -> None:
        super().__init__()
        n, td, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.reparameterized = bool(config.prefix_projection) and not encoded
        if self.reparameterized:
            h = config.encoder_hidden_size or td
            self.embedding = nn.Embedding(n, td)
            self.transform = nn.Sequential(nn.Linear(td, h), nn.Tanh(), nn.Linear(h, layers * 2 * td))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, layers * 2 * td)
            if config.init_weights == "zero" and not encoded:
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.reparameterized else x


def build_encoder(config: PromptLearningConfig, encoded: bool = False) -> nn.Module:
    """The prompt encoder of ``config`` (whose model-derived fields are filled)."""
    total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(total, config.token_dim)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config, total, encoded=encoded)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config, encoded=encoded)
    raise ConfigError(f"{type(config).__name__} is not a prompt-learning config peftkit knows.")


def encoded_output(encoder: nn.Module) -> torch.Tensor:
    """The encoder's output for all its virtual tokens, ``(tokens, width)``: what the model uses and
    what Hugging Face PEFT saves as ``prompt_embeddings``."""
    n = encoder.embedding.num_embeddings
    idx = torch.arange(n, device=encoder.embedding.weight.device).unsqueeze(0)
    return encoder(idx)[0]


__all__ = [
    "PROMPT_TASKS",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "build_encoder",
    "encoded_output",
    "p_tuning_v2_config",
]
