"""Bottleneck adapters: Houlsby, Pfeiffer and parallel adapters (see :mod:`.layer` for the math)."""

from ...config import PeftType
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .config import DEFAULT_PLACEMENT, STYLE_FIELDS, BottleneckConfig, find_targets, hidden_size, prepare
from .layer import ACTIVATIONS, BottleneckLayer, make_layer

class BottleneckModel(BaseTuner):
    """``PeftModel.base_model`` of bottleneck adapter adapters."""

    prefix = "adapter_"


register_method(Method(
    tuner_cls=BottleneckModel,
    peft_type=PeftType.BOTTLENECK,
    config_cls=BottleneckConfig,
    layer_types=(BottleneckLayer,),
    make_layer=make_layer,
    prepare=prepare,
    find_targets=find_targets,
))

__all__ = ["BottleneckModel", "ACTIVATIONS", "DEFAULT_PLACEMENT", "STYLE_FIELDS", "BottleneckConfig", "BottleneckLayer", "find_targets",
           "hidden_size", "make_layer", "prepare"]
