"""Compatibility module: the soft-prompt methods are now the folders ``prompt_tuning``, ``p_tuning`` and
``prefix_tuning`` (configs and encoders); they run in :mod:`peftkit.prompt`."""

from ..config import PROMPT_TASKS, PromptLearningConfig
from ..prompt.virtual import encoded_output
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig, p_tuning_v2_config
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__all__ = [
    "PROMPT_TASKS",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "encoded_output",
    "p_tuning_v2_config",
]
