"""Hugging Face PEFT's ``peft.tuners.p_tuning`` import path."""

from ...methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
