"""Hugging Face PEFT's ``peft.tuners.prompt_tuning`` import path."""

from ...methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
