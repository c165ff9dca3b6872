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
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.ln_tuning import LNTuningConfig
from .methods.lora import LoraConfig
from .methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.partial import PartialConfig
from .methods.prefix_tuning import PrefixTuningConfig, p_tuning_v2_config
from .methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from .methods.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer, TrainableTokensWrapper
from .model import (
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
from .quant import (
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    dequantize_model,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
    save_quantized,
)

__version__ = "0.1.0"

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
    "load_model",
    "load_peft_weights",
    "model_path",
    "set_peft_model_state_dict",
    # QLoRA (peftkit.quant)
    "Int8Linear",
    "NF4Linear",
    "QuantizedLinear",
    "dequantize_model",
    "load_quantized",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "save_quantized",
]
