"""Hugging Face PEFT's ``peft.tuners.trainable_tokens.layer`` import path."""

from ...methods.trainable_tokens import TrainableTokensLayer

__all__ = ["TrainableTokensLayer"]
