"""(IA)³ (Liu et al. 2022): learned vectors rescaling activations. See :mod:`.layer` for the math."""

from ...config import PeftType
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .config import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS, IA3Config, is_feedforward, prepare
from .layer import ConvNd, IA3Layer, Linear, make_layer

class IA3Model(BaseTuner):
    """``PeftModel.base_model`` of IA3 adapters (Hugging Face PEFT's name)."""

    prefix = "ia3_"


register_method(Method(
    tuner_cls=IA3Model,
    peft_type=PeftType.IA3,
    config_cls=IA3Config,
    layer_types=(IA3Layer,),
    make_layer=make_layer,
    default_targets=DEFAULT_TARGETS,
    prepare=prepare,
))

__all__ = ["IA3Model", "DEFAULT_FEEDFORWARD", "DEFAULT_TARGETS", "ConvNd", "IA3Config", "IA3Layer", "Linear", "is_feedforward",
           "make_layer", "prepare"]
