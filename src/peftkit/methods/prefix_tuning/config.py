"""Prefix tuning's config (Hugging Face PEFT's ``PrefixTuningConfig``) and P-tuning v2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from ...config import PeftType, PromptLearningConfig, TaskType, positive_int
from ...errors import ConfigError


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


__all__ = ["PrefixTuningConfig", "p_tuning_v2_config"]
