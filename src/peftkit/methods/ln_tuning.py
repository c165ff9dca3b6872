"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train copies of the norm layers.

Each targeted normalization module ``N`` (LayerNorm, RMSNorm, T5LayerNorm, ...) keeps its frozen
original as ``base_layer`` and gets one trainable deep copy per adapter, ``ln_tuning_layers[a]``::

    y = N_a(x)          (N_a: the copy of adapter a, initially equal to N: a no-op start)

for the single active adapter (a copy replaces the module; several active adapters are refused).
Merging copies the tuned tensors into ``N`` (the originals are kept for an exact unmerge); one adapter
at a time. A mixed batch runs each distinct adapter's copy on its rows (see :class:`CopyLayer`).

Config and file format as Hugging Face PEFT: ``LNTuningConfig(target_modules, exclude_modules,
modules_to_save)`` with HF's default targets per model type, file keys ``<norm>.ln_tuning_layers.weight``
(and ``.bias``). For model types without a default (and plain modules), peftkit targets every
normalization layer of the model (by module type) and writes those names into the saved config, so
Hugging Face PEFT loads the folder too. Copies keep the base dtype (no fp32 autocast, as HF).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from ..config import PeftConfig, PeftType, register_config
from ..errors import TargetError
from ..inject import AdapterLayer, _outer_modules
from . import Method, register_method
from .selective import CopyLayer, _as_list

# Default target modules per model type, as Hugging Face PEFT 0.21.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@register_config
@dataclass
class LNTuningConfig(PeftConfig):
    """Config of LayerNorm tuning (field names and defaults as Hugging Face PEFT 0.21).

    Args:
        target_modules: module names (exact or dotted suffix) or a regex (full match). ``None``: the
            default of the model type (Llama ``["input_layernorm", "post_attention_layernorm", "norm"]``),
            else every normalization layer of the model.
        exclude_modules: modules never adapted (same forms).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
    """

    PEFT_TYPE = PeftType.LN_TUNING

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.modules_to_save = _as_list(self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer with parameters (torch norms, and classes named ``*LayerNorm`` / ``*RMSNorm``)."""
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    named = type(module).__name__.endswith(("LayerNorm", "RMSNorm", "GroupNorm"))
    return (isinstance(module, _NORM_TYPES) or named) and any(True for _ in module.parameters(recurse=False))


def prepare(config: LNTuningConfig, model: nn.Module) -> None:
    """Without target_modules and without a default for the model type: target every norm layer."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is not None or model_type in DEFAULT_TARGETS:
        return
    modules = [(k, m) for k, m in _outer_modules(model) if k]
    norms = [k for k, m in modules if is_norm(m)]
    if not norms:
        raise TargetError(
            f"LNTuningConfig: target_modules is not set, there is no default for model type {model_type!r}, and the "
            "model has no normalization layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm) to tune. Pass target_modules "
            "or use another method."
        )
    leafs = sorted({k.rsplit(".", 1)[-1] for k in norms})
    selected = [k for k, _ in modules if any(k == n or k.endswith("." + n) for n in leafs)]
    # short names when they select exactly the norm layers, else the full module names
    config.target_modules = leafs if sorted(selected) == sorted(norms) else norms


class LNTuningLayer(CopyLayer):
    """LayerNorm tuning of one norm module: ``y = N_a(x)`` with ``N_a`` the active adapter's copy."""

    adapter_layer_names = ("ln_tuning_layers",)
    method_name = "LayerNorm-tuning"


def make_layer(target: nn.Module, config: LNTuningConfig, adapter_name: str, key: str) -> LNTuningLayer:
    if not any(True for _ in target.parameters()):
        raise TargetError(f"{key} ({type(target).__name__}) has no parameters to tune.")
    layer = LNTuningLayer(target)
    layer.update_layer(adapter_name, config, key)
    return layer


register_method(Method(
    peft_type=PeftType.LN_TUNING,
    config_cls=LNTuningConfig,
    layer_types=(LNTuningLayer,),
    make_layer=make_layer,
    prefix="ln_tuning_",
    default_targets=DEFAULT_TARGETS,
    prepare=prepare,
    autocast_adapter_dtype=False,
))
