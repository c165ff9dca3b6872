"""Hugging Face PEFT's ``peft.mixed_model`` import path."""

from .model import PeftMixedModel

__all__ = ["PeftMixedModel"]
