"""Prompt tuning (Lester et al., 2021): ``n`` free virtual-token embeddings ``P ∈ R^{n×d}`` prepended to
the input embeddings; the model reads ``[P; E(x)]`` instead of ``E(x)``. Runs in :mod:`peftkit.prompt`."""

from ...config import PeftType
from ...prompt.model import prompt_model_class
from ...prompt.state import PROMPT_STATE
from ...registry import Method, register_method
from .config import PromptTuningConfig, PromptTuningInit
from .encoder import PromptEmbedding, make_encoder, text_token_ids

register_method(Method(
    peft_type=PeftType.PROMPT_TUNING,
    config_cls=PromptTuningConfig,
    model_class=prompt_model_class,
    make_encoder=make_encoder,
    extra_state=PROMPT_STATE,
))

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit", "make_encoder", "text_token_ids"]
