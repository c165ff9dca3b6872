"""A soft-prompt config's model-derived fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
``num_transformer_submodules``, ``encoder_hidden_size``), filled from the model as Hugging Face PEFT
does and checked against it. For grouped-query attention models prefix tuning uses ``token_dim =
num_kv_heads·head_dim`` and ``num_attention_heads = num_kv_heads`` (the shape of the keys and values).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..config import PromptLearningConfig
from ..errors import ConfigError, PeftkitError
from ..adapter_io import name_or_path
from .encoder_prefix import encoder_attentions
from .introspect import first_attr, takes_cache, text_config


def fill_sizes(base: nn.Module, task: str, config: PromptLearningConfig,
               input_embeddings: Optional[nn.Module]) -> PromptLearningConfig:
    """Fill ``config``'s model-derived fields in place (as Hugging Face PEFT) and check them against
    ``base``, the transformers model of a ``task`` model. Returns ``config``."""
    config.check_ready()
    cfg = text_config(base)
    if cfg is None:
        raise PeftkitError(f"{type(base).__name__} has no config; prompt-learning methods need a "
                           "transformers model.")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if task == "SEQ_2_SEQ_LM" else 1
    context = first_attr(cfg, ("max_position_embeddings", "n_positions"))
    if isinstance(context, int) and config.num_virtual_tokens > context:
        raise ConfigError(f"num_virtual_tokens={config.num_virtual_tokens} is more than the model's context of "
                          f"{context} positions; the virtual tokens could not fit. Use fewer virtual tokens.")
    is_prefix = config.uses_kv_prefix
    if config.num_layers is None:
        names = ("num_decoder_layers", "decoder_layers") if is_prefix and task == "SEQ_2_SEQ_LM" else ()
        config.num_layers = first_attr(cfg, names + ("num_hidden_layers", "num_layers", "n_layer"))
        if config.num_layers is None:
            raise ConfigError("Could not read the number of layers from the model config; set num_layers.")
    if config.num_attention_heads is None:
        config.num_attention_heads = first_attr(
            cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    if config.token_dim is None:
        config.token_dim = first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
        if config.token_dim is None:
            raise ConfigError("Could not read the hidden size from the model config; set token_dim.")
        if is_prefix:
            heads = config.num_attention_heads
            head_dim = first_attr(cfg, ("head_dim", "d_kv"))
            kv_heads = first_attr(cfg, ("num_key_value_heads",))
            if kv_heads is not None:  # grouped-query attention: the prefix has the keys' shape
                head_dim = head_dim or config.token_dim // heads
                config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads
            elif head_dim is not None and heads and head_dim * heads != config.token_dim:
                config.token_dim = head_dim * heads  # e.g. T5 with d_kv·heads != d_model
    if config.num_attention_heads is None:
        raise ConfigError("Could not read the number of attention heads from the model config; set "
                          "num_attention_heads.")
    if getattr(config, "encoder_hidden_size", "absent") is None:
        config.encoder_hidden_size = config.token_dim
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = name_or_path(base)
    if is_prefix:
        check_prefix(base, task, config, cfg)
    else:
        emb = input_embeddings
        if emb is None:
            raise PeftkitError(
                f"{config.peft_type} puts virtual tokens among the input embeddings, but "
                f"{type(base).__name__} has no input embedding layer (get_input_embeddings() returns "
                "none). Use a transformers model with token embeddings."
            )
        if emb.weight.shape[-1] != config.token_dim:
            raise ConfigError(f"token_dim={config.token_dim} does not match the model's embedding size "
                              f"{emb.weight.shape[-1]}.")
    return config


def check_prefix(base: nn.Module, task: str, config: PromptLearningConfig, cfg: Any) -> None:
    """ConfigError / PeftkitError unless a key/value prefix of ``config`` fits the attention of ``base``."""
    if not takes_cache(base):
        raise PeftkitError(
            f"Prefix tuning needs attention layers that take a key/value cache (past_key_values); the attention "
            f"of {type(base).__name__} takes none. Use prompt tuning or P-tuning for this model."
        )
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim={config.token_dim} is not divisible by num_attention_heads="
                          f"{config.num_attention_heads}.")
    head_dim = first_attr(cfg, ("head_dim", "d_kv"))
    kv_heads = first_attr(cfg, ("num_key_value_heads",))
    heads = first_attr(cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    hidden = first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
    want_heads = kv_heads or heads
    want_dim = head_dim or (hidden // heads if hidden and heads else None)
    got_dim = config.token_dim // config.num_attention_heads
    if want_heads and want_dim and (config.num_attention_heads, got_dim) != (want_heads, want_dim):
        raise ConfigError(
            f"The prefix has {config.num_attention_heads} heads of size {got_dim} but the model's keys have "
            f"{want_heads} heads of size {want_dim}; leave token_dim/num_attention_heads unset to take them "
            "from the model."
        )
    names = ("num_decoder_layers", "decoder_layers") if task == "SEQ_2_SEQ_LM" else ()
    layers = first_attr(cfg, names + ("num_hidden_layers", "num_layers", "n_layer"))
    if layers is not None and config.num_layers != layers:
        raise ConfigError(f"num_layers={config.num_layers} but the model has {layers} (decoder) layers.")
    if getattr(config, "encoder_prefix", False):  # (the config's validate() refused it for other tasks)
        for module in encoder_attentions(base):
            heads = first_attr(module, ("num_heads", "n_heads"))
            dim = first_attr(module, ("head_dim", "key_value_proj_dim"))
            if heads and dim and (heads, dim) != (config.num_attention_heads, got_dim):
                raise ConfigError(
                    f"The prefix has {config.num_attention_heads} heads of size {got_dim} but encoder layer "
                    f"{module.layer_idx} has {heads} heads of size {dim}; encoder_prefix needs encoder and decoder "
                    "attention of the same shape."
                )


__all__ = ["check_prefix", "fill_sizes"]
