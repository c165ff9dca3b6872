"""The soft-prompt engine: the PeftModels of prompt tuning, P-tuning and prefix tuning / P-tuning v2.

These methods add no layer to the model; they learn ``n`` virtual tokens that a prompt-learning
PeftModel puts in front of every sequence (input prompts) or in every attention layer's key/value
cache (prefixes). Modules: :mod:`.model` (the PeftModel classes and their bookkeeping),
:mod:`.sizes` (config fields read off the model), :mod:`.virtual` (a batch's virtual tokens,
caches, positions), :mod:`.encoder_prefix` (prefixes on encoder self-attention),
:mod:`.running` (forward and generate), :mod:`.state` (saving and loading), :mod:`.nearest`
(nearest vocabulary tokens), :mod:`.introspect` (what is read off a transformers model). The
methods themselves (configs and encoders) are in ``peftkit/methods/{prompt_tuning,p_tuning,
prefix_tuning}``.
"""

from .model import (
    PROMPT_MODEL_CLASSES,
    PromptLearningModel,
    PromptModelForCausalLM,
    PromptModelForFeatureExtraction,
    PromptModelForSeq2SeqLM,
    PromptModelForSequenceClassification,
    PromptModelForTokenClassification,
    prompt_model_class,
)
from .nearest import NearestToken
from .state import ENCODER_WEIGHTS_NAME, PROMPT_STATE

__all__ = [
    "ENCODER_WEIGHTS_NAME",
    "PROMPT_MODEL_CLASSES",
    "PROMPT_STATE",
    "NearestToken",
    "PromptLearningModel",
    "PromptModelForCausalLM",
    "PromptModelForFeatureExtraction",
    "PromptModelForSeq2SeqLM",
    "PromptModelForSequenceClassification",
    "PromptModelForTokenClassification",
    "prompt_model_class",
]
