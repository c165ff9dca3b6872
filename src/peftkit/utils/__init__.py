"""Hugging Face PEFT's ``peft.utils`` import paths for what peftkit has of them (``peftkit.utils.hotswap``)."""
