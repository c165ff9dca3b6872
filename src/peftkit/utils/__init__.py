"""Hugging Face PEFT's ``peft.utils`` import path: the names of it that concern the methods peftkit
implements (re-exports; docs/compat.md lists what is missing and why)."""

from ..base_state import get_base_model_state_dict, set_base_model_state_dict
from ..checkpoint import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from ..config import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType, TaskType
from ..core.modules_to_save import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from ..core.trainable_tokens import TrainableTokensWrapper
from ..errors import PeftkitError as PeftError
from ..errors import PeftkitWarning as PeftWarning
from ..errors import TargetError as NoMatchingPeftModuleError
from ..methods.ia3 import DEFAULT_FEEDFORWARD as TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
from ..methods.ia3 import DEFAULT_TARGETS as TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
from ..methods.ln_tuning import DEFAULT_TARGETS as TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING
from ..methods.lora import DEFAULT_TARGETS as TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..quant import prepare_model_for_kbit_training
from ..torch_utils import cast_mixed_precision_params, id_tensor_storage, infer_device, shift_tokens_right, transpose

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"

__all__ = [
    "TrainableTokensWrapper",
    "CONFIG_NAME", "INCLUDE_LINEAR_LAYERS_SHORTHAND", "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME", "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "NoMatchingPeftModuleError", "PeftError",
    "PeftType", "PeftWarning", "TaskType", "cast_mixed_precision_params", "get_base_model_state_dict",
    "get_peft_model_state_dict", "id_tensor_storage", "infer_device", "load_peft_weights",
    "prepare_model_for_kbit_training", "set_base_model_state_dict", "set_peft_model_state_dict", "shift_tokens_right",
    "transpose",
]
