"""Trainable tokens: train chosen rows of the embedding table (new special tokens, say), stored as a
small per-adapter table of those rows; a tied output head follows them (see :mod:`.layer`)."""

from ...config import PeftType
from ...core.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .config import TrainableTokensConfig, prepare
from .layer import make_layer, tie_output_heads


class TrainableTokensModel(BaseTuner):
    """``PeftModel.base_model`` of trainable-token adapters (Hugging Face PEFT's name)."""

    prefix = "trainable_tokens_"


register_method(Method(
    tuner_cls=TrainableTokensModel,
    peft_type=PeftType.TRAINABLE_TOKENS,
    config_cls=TrainableTokensConfig,
    layer_types=(TrainableTokensLayer,),
    make_layer=make_layer,
    prepare=prepare,
    after_inject=tie_output_heads,
))

__all__ = ["TrainableTokensConfig", "TrainableTokensModel", "TrainableTokensLayer", "TrainableTokensWrapper", "make_layer", "prepare",
           "tie_output_heads"]
