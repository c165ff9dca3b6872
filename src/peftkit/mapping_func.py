"""Hugging Face PEFT's ``peft.mapping_func`` import path."""

from .model import get_peft_model

__all__ = ["get_peft_model"]
