"""Bottleneck adapters' config, default placements per model type, and where they go in a model."""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from torch import nn

from ...config import PeftConfig, PeftType, as_list, positive_int, probability
from ...core.dispatch import linear_in_out
from ...core.layer import AdapterLayer
from ...core.targets import LAYER_INDEX_REGEX, is_target, model_type_of, no_match, outer_modules, outermost
from ...errors import ConfigError, TargetError

_LLAMA = {"attention_output_modules": ["self_attn.o_proj"], "ffn_output_modules": ["mlp.down_proj"],
          "parallel_modules": ["mlp"], "parallel_input": "input"}
_BERT = {"attention_output_modules": r".*\.attention\.output\.dense", "ffn_output_modules": r".*\.layer\.\d+\.output\.dense",
         "parallel_modules": r".*\.layer\.\d+\.output", "parallel_input": "residual"}
_T5 = {"attention_output_modules": ["SelfAttention.o"], "ffn_output_modules": ["DenseReluDense.wo"],
       "parallel_modules": ["DenseReluDense"], "parallel_input": "input"}

# Default placement per model type.
DEFAULT_PLACEMENT: dict[str, dict[str, Any]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "gpt2": {"attention_output_modules": ["attn.c_proj"], "ffn_output_modules": ["mlp.c_proj"],
             "parallel_modules": ["mlp"], "parallel_input": "input"},
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "t5": _T5, "mt5": _T5,
}

# the placement fields each style uses
STYLE_FIELDS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention_output_modules", "ffn_output_modules"),
    "pfeiffer": ("ffn_output_modules",),
    "parallel": ("parallel_modules",),
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Config of bottleneck adapters.

    Args:
        style: "houlsby" (after attention and after the FFN), "pfeiffer" (after the FFN) or
            "parallel" (beside the FFN).
        reduction_factor: bottleneck size ``m = hidden // reduction_factor`` (must leave m >= 1).
        bottleneck_size: ``m`` directly (overrides reduction_factor).
        non_linearity: "relu", "gelu", "gelu_new", "silu"/"swish" or "tanh".
        use_layer_norm: a LayerNorm on the adapter input.
        scaling: ``s``; ``None`` means 4.0 for "parallel" (He et al.) and 1.0 otherwise.
        adapter_dropout: dropout on the bottleneck activations, in [0, 1).
        init_weights: zero the up-projection (a no-op start); ``False`` leaves it random.
        attention_output_modules: where the "after attention" adapters go (houlsby).
        ffn_output_modules: where the "after FFN" adapters go (houlsby, pfeiffer).
        parallel_modules: the FFN blocks the parallel adapters run beside (parallel).
        parallel_input: "input" (adapter reads the block's input, adds to its output) or "residual"
            (the block is called as ``M(h, r)`` and adds ``r`` itself; the adapter reads ``r`` and
            ``M(h, r + A(r))`` is called). ``None``: the model type's default, else "input".
        exclude_modules / layers_to_transform / layers_pattern: as in LoraConfig.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).

    The ``*_modules`` fields default (``None``) to the placement of the model type (Llama, Mistral,
    Qwen2/3, Gemma, GPT-2, BERT, RoBERTa, T5); other models must set the fields their style uses.
    """

    PEFT_TYPE = PeftType.BOTTLENECK
    REGEX_FIELDS = {**PeftConfig.REGEX_FIELDS, "attention_output_modules": ("str", "{}"),
                    "ffn_output_modules": ("str", "{}"), "parallel_modules": ("str", "{}"),
                    "layers_pattern": ("all", LAYER_INDEX_REGEX)}

    style: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: Optional[int] = None
    non_linearity: Literal["relu", "gelu", "gelu_new", "silu", "swish", "tanh"] = "relu"
    use_layer_norm: bool = False
    scaling: Optional[float] = None
    adapter_dropout: float = 0.0
    init_weights: bool = True
    attention_output_modules: Optional[Union[list[str], str]] = None
    ffn_output_modules: Optional[Union[list[str], str]] = None
    parallel_modules: Optional[Union[list[str], str]] = None
    parallel_input: Optional[Literal["input", "residual"]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        positive_int(self, "reduction_factor", self.reduction_factor)
        if self.bottleneck_size is not None:
            positive_int(self, "bottleneck_size", self.bottleneck_size)
        probability(self, "adapter_dropout", self.adapter_dropout)
        if self.scaling is not None and not math.isfinite(self.scaling):
            raise ConfigError(f"BottleneckConfig.scaling must be a finite number, got {self.scaling!r}.")
        for name in ("attention_output_modules", "ffn_output_modules", "parallel_modules", "exclude_modules",
                     "layers_pattern", "modules_to_save"):
            setattr(self, name, as_list(getattr(self, name)))
        if self.parallel_input is not None and self.style != "parallel":
            raise ConfigError(f"BottleneckConfig.parallel_input is only used with style='parallel', not {self.style!r}.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("BottleneckConfig.layers_pattern is only used together with layers_to_transform.")

    @property
    def placement(self) -> str:
        """How a targeted module is wrapped: "output" (sequential), "input" or "residual" (parallel)."""
        return "output" if self.style != "parallel" else (self.parallel_input or "input")

    @property
    def scale(self) -> float:
        return float(self.scaling) if self.scaling is not None else (4.0 if self.style == "parallel" else 1.0)


def prepare(config: BottleneckConfig, model: nn.Module) -> None:
    """Fill the placement fields of the style from the model type's defaults."""
    model_type = model_type_of(model)
    defaults = DEFAULT_PLACEMENT.get(model_type)
    fields = STYLE_FIELDS[config.style]
    missing = [f for f in fields if getattr(config, f) is None]
    if missing and defaults is None:
        raise ConfigError(
            f"BottleneckConfig(style={config.style!r}) needs {' and '.join(fields)}, and peftkit has no default "
            f"placement for model type {model_type!r}; set {', '.join(missing)} (module names or a regex)."
        )
    for f in missing:
        value = defaults[f]
        setattr(config, f, list(value) if isinstance(value, list) else value)
    if config.style == "parallel" and config.parallel_input is None:
        config.parallel_input = defaults["parallel_input"] if "parallel_modules" in missing else "input"


def find_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    keys: list[str] = []
    for f in STYLE_FIELDS[config.style]:
        spec = types.SimpleNamespace(
            target_modules=getattr(config, f), exclude_modules=config.exclude_modules,
            modules_to_save=config.modules_to_save, layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern)
        found = [k for k, m in outer_modules(model) if k and is_target(spec, k, m)]  # type: ignore[arg-type]
        if not found:
            raise TargetError(no_match(model, f, getattr(config, f)))
        keys += found
    if len(outermost(keys)) != len(dict.fromkeys(keys)):
        raise TargetError("BottleneckConfig: the attention and FFN placements overlap (one module inside another); "
                          "give attention_output_modules and ffn_output_modules disjoint modules.")
    return list(dict.fromkeys(keys))


def _in_out(module: nn.Module) -> Optional[tuple[int, int]]:
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    return linear_in_out(module)


def hidden_size(module: nn.Module, placement: str, key: str) -> int:
    """The size ``d`` of the hidden state the adapter sees at this module."""
    own = _in_out(module)
    linears = [own] if own is not None else [io for m in module.modules() if (io := _in_out(m)) is not None]
    if not linears:
        raise TargetError(f"{key} ({type(module).__name__}): bottleneck adapters wrap linear layers or blocks containing "
                          "them; this module has no linear layer to read the hidden size from.")
    if placement == "output" or placement == "residual":
        return linears[-1][1]
    d_in, d_out = linears[0][0], linears[-1][1]
    if d_in != d_out:
        raise TargetError(f"{key}: a parallel adapter needs a block whose input and output sizes agree; "
                          f"{type(module).__name__} maps {d_in} -> {d_out}.")
    return d_in


__all__ = ["DEFAULT_PLACEMENT", "STYLE_FIELDS", "BottleneckConfig", "find_targets", "hidden_size", "prepare"]
