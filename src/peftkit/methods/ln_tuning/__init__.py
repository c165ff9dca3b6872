"""LayerNorm tuning (Zhao et al. 2023): train copies of the normalization layers (see :mod:`.layer`)."""

from ...config import PeftType
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .config import DEFAULT_TARGETS, LNTuningConfig, is_norm, prepare
from .layer import LNTuningLayer, make_layer

class LNTuningModel(BaseTuner):
    """``PeftModel.base_model`` of LayerNorm tuning adapters (Hugging Face PEFT's name)."""

    prefix = "ln_tuning_"


register_method(Method(
    tuner_cls=LNTuningModel,
    peft_type=PeftType.LN_TUNING,
    config_cls=LNTuningConfig,
    layer_types=(LNTuningLayer,),
    make_layer=make_layer,
    default_targets=DEFAULT_TARGETS,
    prepare=prepare,
    autocast_adapter_dtype=False,
))

__all__ = ["LNTuningModel", "DEFAULT_TARGETS", "LNTuningConfig", "LNTuningLayer", "is_norm", "make_layer", "prepare"]
