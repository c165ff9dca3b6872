"""Hugging Face PEFT's ``peft.tuners.lora.config`` import path."""

from ...methods.lora.config import LoraConfig

__all__ = ["LoraConfig"]
