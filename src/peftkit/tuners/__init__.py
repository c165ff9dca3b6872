"""Hugging Face PEFT's ``peft.tuners`` import path: the configs and tuner classes of the methods
peftkit implements (re-exports; peftkit's own code lives in :mod:`peftkit.methods`)."""

from ..methods.ia3 import IA3Config, IA3Model
from ..methods.ln_tuning import LNTuningConfig, LNTuningModel
from ..methods.lora import LoraConfig, LoraModel
from ..methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from ..methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from ..methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from ..methods.trainable_tokens import TrainableTokensConfig

__all__ = ["IA3Config", "IA3Model", "LNTuningConfig", "LNTuningModel", "LoraConfig", "LoraModel", "PrefixEncoder",
           "PrefixTuningConfig", "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig",
           "PromptEncoderReparameterizationType", "PromptTuningConfig", "PromptTuningInit", "TrainableTokensConfig"]
