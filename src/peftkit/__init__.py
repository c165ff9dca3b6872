"""peftkit: parameter-efficient fine-tuning for PyTorch and transformers, Hugging Face PEFT compatible."""

from . import methods  # noqa: F401  (the built-in methods, registered in peftkit.registry)
from .assets import load_model, model_path
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .checkpoint import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .config import PeftConfig, PeftType, PromptLearningConfig, TaskType
from .errors import (
    AdapterNameError,
    CheckpointError,
    ConfigError,
    MergeError,
    PeftkitError,
    PeftkitWarning,
    TargetError,
)
from .base_state import get_base_model_state_dict, set_base_model_state_dict
from .errors import PeftkitError as PeftError
from .errors import PeftkitWarning as PeftWarning
from .errors import TargetError as NoMatchingPeftModuleError
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config, IA3Model
from .methods.ln_tuning import LNTuningConfig, LNTuningModel
from .methods.lora import LoraConfig, LoraModel, keep_sparsity
from .methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.partial import PartialConfig
from .methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig, p_tuning_v2_config
from .methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .methods.trainable_tokens import (
    TrainableTokensConfig,
    TrainableTokensLayer,
    TrainableTokensModel,
    TrainableTokensWrapper,
)
from .model import (
    PeftMixedModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
)
from .mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .torch_utils import cast_mixed_precision_params, shift_tokens_right
from .quant import (
    DynamicInt8Report,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    dequantize_model,
    is_dynamic_int8,
    load_dynamic_int8,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_dynamic_int8,
    quantize_model,
    save_dynamic_int8,
    save_quantized,
)

from .prune import (
    PruneResult,
    SparsityReport,
    StructuredResult,
    apply_masks,
    calibration_batches,
    collect_input_norms,
    load_masks,
    load_structured,
    prune_model,
    save_masks,
    save_structured,
    sparsity_report,
    structured_prune,
)

from .version import __version__  # noqa: E402
from .as_peft import PEFT_API_VERSION, install_as_peft, is_installed_as_peft  # noqa: E402

__all__ = [
    "AdapterNameError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "CheckpointError",
    "ConfigError",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "p_tuning_v2_config",
    "IA3Config",
    "LNTuningConfig",
    "BottleneckConfig",
    "BitFitConfig",
    "PartialConfig",
    "TrainableTokensConfig",
    "TrainableTokensLayer",
    "TrainableTokensWrapper",
    "MergeError",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftkitError",
    "PeftkitWarning",
    "TargetError",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "keep_sparsity",
    "load_model",
    "load_peft_weights",
    "model_path",
    "set_peft_model_state_dict",
    # Hugging Face PEFT names (docs/compat.md)
    "IA3Model",
    "LNTuningModel",
    "LoraModel",
    "TrainableTokensModel",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "NoMatchingPeftModuleError",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftError",
    "PeftMixedModel",
    "PeftWarning",
    "PrefixEncoder",
    "PromptEmbedding",
    "PromptEncoder",
    "TunerLayerStatus",
    "TunerModelStatus",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "set_base_model_state_dict",
    "shift_tokens_right",
    # running as `peft` inside transformers / TRL / accelerate / lm-eval (peftkit.as_peft)
    "PEFT_API_VERSION",
    "install_as_peft",
    "is_installed_as_peft",
    # pruning (peftkit.prune) and sparsity-preserving LoRA
    "PruneResult",
    "SparsityReport",
    "StructuredResult",
    "apply_masks",
    "calibration_batches",
    "collect_input_norms",
    "load_masks",
    "load_structured",
    "prune_model",
    "save_masks",
    "save_structured",
    "sparsity_report",
    "structured_prune",
    # QLoRA (peftkit.quant)
    "Int8Linear",
    "NF4Linear",
    "QuantizedLinear",
    "dequantize_model",
    "load_quantized",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "save_quantized",
    # int8 dynamic quantization for CPU inference (peftkit.quant.dynamic; torchao)
    "DynamicInt8Report",
    "is_dynamic_int8",
    "load_dynamic_int8",
    "quantize_dynamic_int8",
    "save_dynamic_int8",
]
