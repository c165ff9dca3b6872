"""LayerNorm tuning's config, default targets per model type, and the norm-layer finder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from ...config import PeftConfig, PeftType, as_list
from ...core.layer import AdapterLayer
from ...core.targets import outer_modules
from ...errors import TargetError

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
        self.target_modules = as_list(self.target_modules)
        self.exclude_modules = as_list(self.exclude_modules)
        self.modules_to_save = as_list(self.modules_to_save)
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
    modules = [(k, m) for k, m in outer_modules(model) if k]
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


__all__ = ["DEFAULT_TARGETS", "LNTuningConfig", "is_norm", "prepare"]
