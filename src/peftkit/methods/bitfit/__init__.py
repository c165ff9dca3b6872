"""BitFit: train only the bias terms (see :mod:`.layer` for the math)."""

from ...config import PeftType
from ...registry import Method, register_method
from .config import BitFitConfig
from .layer import BitFitLayer, make_bitfit_layer
from .targets import find_bias_targets

register_method(Method(
    peft_type=PeftType.BITFIT,
    config_cls=BitFitConfig,
    layer_types=(BitFitLayer,),
    make_layer=make_bitfit_layer,
    find_targets=find_bias_targets,
))

__all__ = ["BitFitConfig", "BitFitLayer", "find_bias_targets", "make_bitfit_layer"]
