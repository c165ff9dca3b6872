"""Hugging Face PEFT's ``peft.utils.other`` import path."""

from ..config import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from ..core.modules_to_save import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from ..quant import prepare_model_for_kbit_training
from ..torch_utils import cast_mixed_precision_params, id_tensor_storage, infer_device, shift_tokens_right, transpose


__all__ = ["CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper",
           "cast_mixed_precision_params", "id_tensor_storage", "infer_device", "prepare_model_for_kbit_training",
           "shift_tokens_right", "transpose"]
