"""Hugging Face PEFT's ``peft.tuners.trainable_tokens`` import path."""

from ...methods.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer, TrainableTokensModel

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel"]
