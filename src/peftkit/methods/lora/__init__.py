"""LoRA and its variants: rsLoRA scaling, DoRA, gaussian / PiSSA init, QLoRA over quantized bases.

For a frozen weight ``W`` (out x in) LoRA learns ``A`` (r x in) and ``B`` (out x r)::

    y = W x + b + s · B A dropout(x),      s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

Files: :mod:`.config` (LoraConfig), :mod:`.layer` (the shared bookkeeping), :mod:`.linear`,
:mod:`.embedding`, :mod:`.conv`, :mod:`.mha` (the layer types), :mod:`.dora` (DoRA as a variant object),
:mod:`.fast_path` (the no-grad road of Linear),
:mod:`.fused` (the fused training road of Linear: base and adapter in one autograd node), :mod:`.dispatch` (which layer wraps a module),
:mod:`.param` (LoRA on bare parameters, ``target_parameters``: MoE expert tensors),
:mod:`.combine` (``add_weighted_adapter``), :mod:`.sparse` (``keep_sparsity``: LoRA over a pruned base).
"""

from ...config import PeftType
from ...registry import Method, register_method
from ...tuner import BaseTuner
from .combine import add_weighted_adapter, combine_layer
from .config import DEFAULT_TARGETS, LoraConfig
from .conv import ConvNd
from .dispatch import make_layer
from .dora import DoraConv, DoraEmbedding, DoraLinear, DoraMagnitude, DoraVariant
from .embedding import Embedding
from .fused import FusedLoraLinear, set_fused_training
from .layer import LoraLayer
from .linear import Linear
from .mha import MixedBatchUnsupportedError, MultiheadAttention
from .param import ParamWrapper, make_param_layer
from .sparse import keep_sparsity


class LoraModel(BaseTuner):
    """``PeftModel.base_model`` of LoRA adapters (Hugging Face PEFT's name)."""

    prefix = "lora_"


register_method(Method(
    tuner_cls=LoraModel,
    peft_type=PeftType.LORA,
    config_cls=LoraConfig,
    layer_types=(LoraLayer,),
    make_layer=make_layer,
    make_param_layer=make_param_layer,
    default_targets=DEFAULT_TARGETS,
    combine=add_weighted_adapter,
    saves_embedding_layers=True,
    aliases={"dora": {"use_dora": True}},
))

__all__ = ["LoraModel", "DEFAULT_TARGETS", "ConvNd", "DoraConv", "DoraEmbedding", "DoraLinear", "DoraMagnitude",
           "DoraVariant", "Embedding", "FusedLoraLinear", "Linear", "LoraConfig", "LoraLayer", "MixedBatchUnsupportedError",
           "MultiheadAttention", "ParamWrapper", "add_weighted_adapter", "combine_layer", "keep_sparsity", "make_layer",
           "make_param_layer", "set_fused_training"]
