"""(IA)³'s config, its default targets per model type and the feed-forward rule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from ...config import PeftConfig, PeftType, as_list, as_set
from ...core.targets import model_type_of
from ...errors import ConfigError

# Default target / feed-forward modules per model type (when not given), as Hugging Face PEFT 0.21.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(PeftConfig):
    """Config of (IA)³ (field names and defaults as Hugging Face PEFT 0.21).

    Args:
        target_modules: module names (exact or dotted suffix), a regex (full match), or "all-linear".
            ``None``: the default of the model type (e.g. Llama ``["k_proj", "v_proj", "down_proj"]``).
        exclude_modules: modules never adapted (same forms as target_modules).
        feedforward_modules: the targets whose **input** is scaled (the others' output is); a subset
            of target_modules. ``None``: the default of the model type (Llama ``["down_proj"]``).
        fan_in_fan_out: the base stores its weight as (in, out) (GPT-2 ``Conv1D``; set automatically
            for those layers).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
        init_ia3_weights: start the vectors at ones (a no-op); ``False`` draws them from N(0, 1).
    """

    PEFT_TYPE = PeftType.IA3
    REGEX_FIELDS = {**PeftConfig.REGEX_FIELDS, "feedforward_modules": ("str", "{}")}

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        self.target_modules = as_set(self.target_modules)  # sets, as in Hugging Face PEFT
        self.exclude_modules = as_set(self.exclude_modules)
        self.feedforward_modules = as_set(self.feedforward_modules)
        if isinstance(self.modules_to_save, (set, frozenset, tuple)):
            self.modules_to_save = as_list(self.modules_to_save)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = sorted(self.feedforward_modules - self.target_modules)
            if extra:
                raise ConfigError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules; {extra} are not in "
                    f"target_modules={sorted(self.target_modules)}. Add them to target_modules or remove them."
                )


def is_feedforward(config: IA3Config, key: str) -> bool:
    """Hugging Face's rule: a regex must match the whole key, a list entry matches a key ending with it."""
    ff = config.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(name) for name in ff)


def prepare(config: IA3Config, model: nn.Module) -> None:
    """Fill ``feedforward_modules`` from the model type when it is not given (as Hugging Face PEFT)."""
    if config.feedforward_modules is not None:
        return
    model_type = model_type_of(model)
    if model_type in DEFAULT_FEEDFORWARD:
        config.feedforward_modules = set(DEFAULT_FEEDFORWARD[model_type])
    elif config.target_modules is not None:
        raise ConfigError(
            f"IA3Config.feedforward_modules is not set and peftkit has no default for model type {model_type!r}; "
            "pass feedforward_modules (the targets whose input is scaled; [] if none of them is a feed-forward layer)."
        )
    # else: target_modules is also None; the generic default-target lookup reports the unknown model type


__all__ = ["DEFAULT_FEEDFORWARD", "DEFAULT_TARGETS", "IA3Config", "is_feedforward", "prepare"]
