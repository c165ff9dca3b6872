"""Partial fine-tuning: whole transformer blocks or named modules trained in full (see :mod:`.layer`)."""

from ...config import PeftType
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .config import PartialConfig
from .layer import PartialLayer, make_partial_layer
from .targets import block_lists, find_partial_targets

class PartialModel(BaseTuner):
    """``PeftModel.base_model`` of partial tuning adapters."""

    prefix = "partial_"


register_method(Method(
    tuner_cls=PartialModel,
    peft_type=PeftType.PARTIAL,
    config_cls=PartialConfig,
    layer_types=(PartialLayer,),
    make_layer=make_partial_layer,
    find_targets=find_partial_targets,
    autocast_adapter_dtype=False,
))

__all__ = ["PartialModel", "PartialConfig", "PartialLayer", "block_lists", "find_partial_targets", "make_partial_layer"]
