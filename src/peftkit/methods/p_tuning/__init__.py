"""P-tuning v1 (Liu et al., 2021): virtual tokens ``P = f(E_v)`` from free embeddings through an MLP or
bidirectional-LSTM reparameterization encoder, used as input prompts. Runs in :mod:`peftkit.prompt`."""

from ...config import PeftType
from ...prompt.model import prompt_model_class
from ...prompt.state import PROMPT_STATE
from ...registry import Method, register_method
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .encoder import PromptEncoder, make_encoder

register_method(Method(
    peft_type=PeftType.P_TUNING,
    config_cls=PromptEncoderConfig,
    model_class=prompt_model_class,
    make_encoder=make_encoder,
    extra_state=PROMPT_STATE,
))

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType", "make_encoder"]
