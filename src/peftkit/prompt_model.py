"""Compatibility module: the prompt-learning PeftModels now live in :mod:`peftkit.prompt`."""

from .methods.prompt_tuning.encoder import text_token_ids
from .prompt.model import (
    PROMPT_MODEL_CLASSES,
    PromptLearningModel,
    PromptModelForCausalLM,
    PromptModelForFeatureExtraction,
    PromptModelForSeq2SeqLM,
    PromptModelForSequenceClassification,
    PromptModelForTokenClassification,
    prompt_model_class,
)
from .prompt.nearest import NearestToken
from .prompt.state import ENCODER_WEIGHTS_NAME

__all__ = [
    "ENCODER_WEIGHTS_NAME",
    "NearestToken",
    "PROMPT_MODEL_CLASSES",
    "PromptLearningModel",
    "PromptModelForCausalLM",
    "PromptModelForFeatureExtraction",
    "PromptModelForSeq2SeqLM",
    "PromptModelForSequenceClassification",
    "PromptModelForTokenClassification",
    "prompt_model_class",
    "text_token_ids",
]
