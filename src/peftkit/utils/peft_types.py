"""Hugging Face PEFT's ``peft.utils.peft_types`` import path."""

from ..config import PeftType, TaskType

__all__ = ["PeftType", "TaskType"]
