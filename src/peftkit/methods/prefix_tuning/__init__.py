"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): every attention layer ``l`` gets
``n`` extra keys and values ``K_l, V_l ∈ R^{heads_kv×n×head_dim}``, prepended to its own through the
transformers ``Cache`` API. All layers' prefixes are one matrix ``Z ∈ R^{n × (2·L·heads_kv·head_dim)}``:
free (P-tuning v2, ``prefix_projection=False``) or ``Z = W₂·tanh(W₁·E_v + b₁) + b₂`` (the paper's MLP
reparameterization). Runs in :mod:`peftkit.prompt`."""

from ...config import PeftType
from ...prompt.model import prompt_model_class
from ...prompt.state import PROMPT_STATE
from ...registry import Method, register_method
from .config import PrefixTuningConfig, p_tuning_v2_config
from .encoder import PrefixEncoder, make_encoder

register_method(Method(
    peft_type=PeftType.PREFIX_TUNING,
    config_cls=PrefixTuningConfig,
    model_class=prompt_model_class,
    make_encoder=make_encoder,
    extra_state=PROMPT_STATE,
))

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "make_encoder", "p_tuning_v2_config"]
