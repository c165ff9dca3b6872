"""Hugging Face PEFT's ``peft.tuners.lora.model`` import path."""

from ...methods.lora import LoraModel

__all__ = ["LoraModel"]
