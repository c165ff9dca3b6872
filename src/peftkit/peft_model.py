"""Hugging Face PEFT's ``peft.peft_model`` import path: the PeftModel classes and the status helpers."""

from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = ["PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
           "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
           "TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]
