"""Hugging Face PEFT's ``peft.utils.save_and_load`` import path."""

from ..base_state import get_base_model_state_dict, set_base_model_state_dict
from ..checkpoint import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

__all__ = ["get_base_model_state_dict", "get_peft_model_state_dict", "load_peft_weights", "set_base_model_state_dict",
           "set_peft_model_state_dict"]
