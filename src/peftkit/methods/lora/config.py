"""LoRA's config (field names and defaults as Hugging Face PEFT 0.21) and its default targets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ...config import PeftConfig, PeftType, as_set, positive_int, probability, unsupported
from ...core.targets import LAYER_INDEX_REGEX
from ...errors import ConfigError, ConfigTypeError

# Default target modules per model type (when target_modules is None), as Hugging Face PEFT.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
}


# The regex a ``rank_pattern`` / ``alpha_pattern`` key goes into ("{}"): it matches the end of a module name.
PATTERN_KEY_REGEX = r"(.*\.)?({})$"


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """``rank_pattern`` / ``alpha_pattern`` lookup: a pattern matches a key that ends with it."""
    for pattern, value in patterns.items():
        if re.match(PATTERN_KEY_REGEX.replace("{}", pattern), key):
            return value
    return default


@dataclass
class LoraConfig(PeftConfig):
    """Config of LoRA (field names and defaults as Hugging Face PEFT 0.21).

    Args:
        r: rank of the update (> 0).
        target_modules: module names (exact or dotted suffix), a regex (full match), or "all-linear".
        exclude_modules: modules never adapted (same forms as target_modules).
        lora_alpha: scale numerator; scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter input, in [0, 1).
        fan_in_fan_out: the base stores its weight as (in, out) (GPT-2 ``Conv1D``).
        bias: "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
        init_lora_weights: True (kaiming A, zero B), "gaussian" (A ~ N(0, 1/r)), False (random, not
            a no-op), "pissa" or "pissa_niter_<n>" (principal singular vectors; edits the base weight).
        layers_to_transform / layers_pattern: only adapt these layer indices.
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a pattern matched at the end of
            the module name.
        use_dora: weight-decomposed LoRA.
        lora_bias: give B a trainable bias.
        trainable_token_indices: also train these rows of the input embedding (a list), or of the
            named embedding layers (``{"embed_tokens": [...]}``), as trainable tokens; a tied output
            head follows the embedding's rows.
        ensure_weight_tying: keep tied embeddings tied in what the adapter trains: an embedding in
            ``modules_to_save`` is trained once for both (the head's copy shares the weight), and tied
            layers in ``trainable_token_indices`` must get the same indices.
        target_parameters: parameters adapted directly (:mod:`.param`), for modules that use an
            ``nn.Parameter`` rather than a linear layer, e.g. the 3-D expert tensors of MoE layers
            (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``): full parameter names or
            dotted suffixes, no regex. Set ``target_modules=[]`` to adapt only parameters. Not with
            ``lora_dropout``, ``use_dora``, ``lora_bias``, ``fan_in_fan_out`` or PiSSA init.
    """

    PEFT_TYPE = PeftType.LORA
    REGEX_FIELDS = {**PeftConfig.REGEX_FIELDS, "layers_pattern": ("all", LAYER_INDEX_REGEX),
                    "rank_pattern": ("keys", PATTERN_KEY_REGEX), "alpha_pattern": ("keys", PATTERN_KEY_REGEX)}

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    alpha_pattern: Optional[dict[str, int | float]] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    # Fields of the Hugging Face format that peftkit carries for round trips but does not implement.
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    monteclora_config: Optional[Any] = None
    arrow_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: Optional[list] = None
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    alora_invocation_tokens: Optional[list[int]] = None
    ensure_weight_tying: bool = False
    use_bdlora: Optional[Any] = None

    def validate(self) -> None:
        positive_int(self, "r", self.r)
        probability(self, "lora_dropout", self.lora_dropout)
        self.target_modules = as_set(self.target_modules)  # a set, as in Hugging Face PEFT
        self.exclude_modules = as_set(self.exclude_modules)
        for name, value in (self.rank_pattern or {}).items():
            positive_int(self, f"rank_pattern[{name!r}]", value)
        self.rank_pattern = self.rank_pattern or {}
        self.alpha_pattern = self.alpha_pattern or {}
        init = self.init_lora_weights
        if isinstance(init, str) and not (init in ("gaussian", "pissa") or re.fullmatch(r"pissa_niter_\d+", init)):
            raise ConfigError(
                f"LoraConfig.init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa' "
                "or 'pissa_niter_<n>'."
            )
        if self.use_dora and self.lora_bias:
            raise ConfigError("LoraConfig: use_dora=True cannot be combined with lora_bias=True.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str: put the layers in "
                              "the regex.")
        if isinstance(self.target_modules, str) and self.layers_pattern:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str: put the layers in the "
                              "regex.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(LoraConfig.layers_pattern is only used together with layers_to_transform.)")
        self._check_target_parameters()
        unsupported(self, "megatron_config", self.megatron_config, None)
        unsupported(self, "loftq_config", self.loftq_config, {}, "LoftQ init")
        for name in ("eva_config", "corda_config", "kasa_config", "lora_ga_config", "monteclora_config",
                     "arrow_config", "velora_config", "layer_replication",
                     "alora_invocation_tokens", "use_bdlora"):
            unsupported(self, name, getattr(self, name), None)
        unsupported(self, "use_qalora", self.use_qalora, False)
        self._check_token_indices()

    def _check_token_indices(self) -> None:
        tokens = self.trainable_token_indices
        groups = tokens.items() if isinstance(tokens, dict) else [("", tokens)] if tokens is not None else []
        for layer, indices in groups:
            where = f"LoraConfig.trainable_token_indices{f'[{layer!r}]' if layer else ''}"
            if not indices or any(i < 0 for i in indices) or len(set(indices)) != len(indices):
                raise ConfigError(f"{where} must be a non-empty list of distinct token indices >= 0, got {indices!r}.")

    def __post_init__(self) -> None:
        if isinstance(self.target_parameters, str):  # before the generic type check: PEFT's message
            raise ConfigTypeError(f"`target_parameters` must be a list of strings or None. LoraConfig.target_parameters="
                                  f"{self.target_parameters!r}: give a list of parameter names (e.g. "
                                  "['mlp.experts.gate_up_proj']); matching parameters by regex is not supported.")
        super().__post_init__()

    def _check_target_parameters(self) -> None:
        value = self.target_parameters
        if value is None:
            return
        if isinstance(value, (tuple, set)):
            value = sorted(value) if isinstance(value, set) else list(value)
        bad = [v for v in value if not isinstance(v, str) or not v.strip(".")]
        if bad:
            raise ConfigError(f"LoraConfig.target_parameters must hold parameter names (non-empty strings), got "
                              f"{bad[0]!r}.")
        self.target_parameters = list(value)

    def rank_for(self, key: str) -> int:
        return _pattern_value(self.rank_pattern or {}, key, self.r)

    def alpha_for(self, key: str) -> float:
        return _pattern_value(self.alpha_pattern or {}, key, self.lora_alpha)


__all__ = ["DEFAULT_TARGETS", "LoraConfig"]
