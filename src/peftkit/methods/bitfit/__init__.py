"""BitFit: train only the bias terms (see :mod:`.layer` for the math)."""

from ...config import PeftType
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .config import BitFitConfig
from .layer import BitFitLayer, make_bitfit_layer
from .targets import find_bias_targets

class BitFitModel(BaseTuner):
    """``PeftModel.base_model`` of BitFit adapters."""

    prefix = "bitfit_"


register_method(Method(
    tuner_cls=BitFitModel,
    peft_type=PeftType.BITFIT,
    config_cls=BitFitConfig,
    layer_types=(BitFitLayer,),
    make_layer=make_bitfit_layer,
    find_targets=find_bias_targets,
))

__all__ = ["BitFitModel", "BitFitConfig", "BitFitLayer", "find_bias_targets", "make_bitfit_layer"]
