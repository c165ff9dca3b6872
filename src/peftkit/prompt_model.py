"""The prompt-learning PeftModels: prompt tuning, P-tuning, prefix tuning / P-tuning v2.

The in-memory structure is Hugging Face PEFT's: ``base_model`` is the user's model itself (no
wrapper), ``prompt_encoder`` a ModuleDict of encoders keyed by adapter name, classifier heads wrapped
in ``ModulesToSaveWrapper``. ``adapter_model.safetensors`` holds ``prompt_embeddings`` (the
encoder's *output*) and the heads, so folders load in either library.

How virtual tokens reach the model (the batch has ``B`` rows of ``L`` tokens):

* **input prompts** (prompt tuning, P-tuning): the model reads ``[P; E(x)]`` (``E`` its input
  embeddings) with the attention mask ``[1ⁿ; m]``; causal-LM and token-classification labels get
  ``-100`` for the virtual positions, ``token_type_ids`` get type 0. Outputs cover ``n + L``
  positions, as in Hugging Face PEFT. Encoder-decoder models get the prompt on the encoder.
* **key/value prefixes** (prefix tuning, P-tuning v2): the prompt matrix is viewed as
  ``(2·layers, kv_heads, n, head_dim)`` and written into a transformers ``DynamicCache`` (an
  ``EncoderDecoderCache`` self-attention cache for encoder-decoder decoders), passed as
  ``past_key_values``; the attention mask gets ``1ⁿ`` in front. No model code is patched. Models
  whose attention takes no cache are refused. For encoder-decoder models decoder layer ``i`` uses
  stored layer ``2·i mod layers`` — what Hugging Face PEFT computes from the same tensor, kept so
  that a folder gives the same outputs in both libraries.
* **encoder prefixes** (``PrefixTuningConfig(encoder_prefix=True)``, encoder-decoder models): the
  encoder stack passes no cache to its layers, so for the duration of the call a forward pre-hook on
  each encoder self-attention module hands it a one-layer ``DynamicCache`` holding its prefix
  (stored layer ``2·j+1 mod layers`` for encoder layer ``j``) as its own ``past_key_values``
  argument, and puts the prefix columns in front of its attention mask. The module's code runs
  unchanged (T5 then counts the text's relative positions from the prefix length); the hooks are
  removed when the call returns.
* **generate** prefills a cache: the prefix, or the base model's keys/values for the soft prompt,
  then calls the model's own ``generate`` with ``past_key_values`` and the full attention mask,
  which restarts from that cache. Position ids in ``generate`` come from the attention mask, so
  left-padded batches generate what each row generates alone.

**Mixed batches** (``adapter_names``, one per row, ``"__base__"`` for none) may combine adapters of
different lengths and methods. Each row's prompt is left-padded to the longest prompt of its kind
and the padding is masked out, so row ``i`` reads ``[pad; P_i; x_i]`` and its last ``n_i + L``
outputs are what it gets alone. (Bidirectional encoders such as BERT pool position 0, so there the
row is fed as ``[P_i; x_i; pad]`` and the per-token outputs are rotated back to the same layout.)
Position ids: a row's tokens get the positions they get when the row runs with its adapter alone
(virtual tokens ``0..n_i-1``, text from ``n_i``): the padding takes no position. peftkit passes
such ``position_ids`` whenever the rows differ; models that take none must use relative positions
(T5), otherwise a PeftkitError says so. Key/value prefixes carry no position, and are left-padded
in the cache the same way.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import inject as engine
from .checkpoint import adapter_entries, load_tensors
from .config import PeftConfig, TaskType
from .errors import AdapterNameError, CheckpointError, ConfigError, MergeError, PeftkitError, PeftkitWarning
from .inject import BASE_ADAPTER, ModulesToSaveWrapper
from .methods.prompt import (
    PROMPT_TASKS,
    PrefixTuningConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    build_encoder,
    encoded_output,
)
from .model import (
    TASK_HEADS,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    _check_new_name,
    _name_or_path,
    prepare_config,
)

# Saved beside adapter_model.safetensors when an encoder reparameterizes the prompt (P-tuning, prefix
# projection): the encoder's own weights, so that training can resume. Hugging Face PEFT ignores it.
ENCODER_WEIGHTS_NAME = "peftkit_prompt_encoder.safetensors"
_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class NearestToken:
    """A vocabulary token near a virtual token (cosine similarity ``score`` in [-1, 1])."""

    token_id: int
    score: float
    token: Optional[str] = None


@dataclass
class _Virtual:
    """What the adapters of a batch add. ``n_input``/``n_prefix``: real virtual tokens per row (on
    the batch's device, for index arithmetic); ``input_counts``/``prefix_counts``: the same on the
    host, for decisions that must not wait for the device."""

    embeds: Optional[torch.Tensor]  # (B, Np, d)
    embeds_mask: Optional[torch.Tensor]  # (B, Np)
    kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]]  # per decoder layer: (B, H, Nk, hd) each
    kv_mask: Optional[torch.Tensor]  # (B, Nk)
    n_input: torch.Tensor  # (B,)
    n_prefix: torch.Tensor  # (B,)
    input_counts: tuple[int, ...]
    prefix_counts: tuple[int, ...]
    enc_kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # per encoder layer (encoder_prefix)
    enc_kv_mask: Optional[torch.Tensor] = None  # (B, Nk): kv_mask, zero for rows without encoder prefixes
    enc_full: bool = False  # every row reads all Nk encoder-prefix columns (no mask needed)

    @property
    def uniform(self) -> bool:
        """Every row has the same virtual-token count of each kind (no padding added), also when
        the rows' adapters differ."""
        return self.uniform_input and self.uniform_prefix

    @property
    def uniform_input(self) -> bool:
        return len(set(self.input_counts)) <= 1

    @property
    def uniform_prefix(self) -> bool:
        return len(set(self.prefix_counts)) <= 1

    @property
    def n_embeds(self) -> int:
        return 0 if self.embeds is None else self.embeds.shape[1]

    @property
    def n_kv(self) -> int:
        return 0 if self.kv_mask is None else self.kv_mask.shape[1]


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # pragma: no cover - unusual configs
            return cfg
    return cfg


def _first_attr(cfg: Any, names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _takes_cache(model: nn.Module) -> bool:
    """Whether an attention module of ``model`` takes a key/value cache argument."""
    for module in model.modules():
        name = type(module).__name__.lower()
        if module is model or ("attention" not in name and "attn" not in name):
            continue
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            continue
        if any(a in params for a in _CACHE_ARGS):
            return True
    return False


def _is_causal(model: nn.Module) -> bool:
    """Whether ``model``'s self-attention is causal (a decoder); BERT-style encoders are not."""
    return any(getattr(m, "is_causal", None) is True for m in model.modules()
               if "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower())


def _prefix_mask(mask: Any, keep: torch.Tensor, full: bool, hidden: torch.Tensor, module: nn.Module) -> Any:
    """An encoder attention mask over ``[prefix; text]`` keys from one over the text keys.

    ``keep`` (B, n) marks the prefix columns a row reads. Handles the mask forms transformers
    builds: ``None`` (attend to all), boolean or additive float ``(B|1, 1, q, k)``, and a 2-D
    ``(B, k)`` padding mask."""
    B, n = keep.shape
    if mask is None:
        if full:
            return None
        q = k = hidden.shape[1]
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
        if implementation == "eager":
            mask = torch.zeros(B, 1, q, k, dtype=hidden.dtype, device=hidden.device)
        else:
            mask = torch.ones(B, 1, q, k, dtype=torch.bool, device=hidden.device)
    if not isinstance(mask, torch.Tensor):
        raise PeftkitError(f"encoder_prefix cannot extend an attention mask of type {type(mask).__name__} (flex "
                           "attention); load the model with attn_implementation='eager' or 'sdpa'.")
    if mask.dim() == 2:
        return torch.cat([keep.to(mask.dtype), mask], dim=1)
    if mask.dim() != 4:
        raise PeftkitError(f"encoder_prefix cannot extend a {mask.dim()}-D attention mask.")
    mask = mask.expand(B, -1, -1, -1)
    cols = keep.bool()[:, None, None, :].expand(B, 1, mask.shape[2], n)
    if mask.dtype != torch.bool:
        cols = torch.zeros(cols.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~cols, torch.finfo(mask.dtype).min)
    return torch.cat([cols, mask], dim=-1)


def _roll(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``t`` (B, T, ...) left by ``shift[b]`` positions along dim 1."""
    T = t.shape[1]
    idx = (torch.arange(T, device=t.device).unsqueeze(0) + shift.to(t.device).unsqueeze(1)) % T
    idx = idx.view(idx.shape + (1,) * (t.dim() - 2)).expand(t.shape)
    return t.gather(1, idx)


def _is_relative(cfg: Any) -> bool:
    """Models whose attention depends on relative positions only (T5's bucketed bias)."""
    return getattr(cfg, "relative_attention_num_buckets", None) is not None


def prompt_model_class(cls: type[PeftModel], config: PeftConfig) -> type[PeftModel]:
    """The prompt-learning PeftModel class for ``cls`` (a task class or PeftModel) and ``config``."""
    if isinstance(cls, type) and issubclass(cls, PromptLearningModel):
        return cls
    for prompt_cls in PROMPT_MODEL_CLASSES.values():
        if cls is not PeftModel and issubclass(prompt_cls, cls):
            return prompt_cls
    task = str(config.task_type) if config.task_type is not None else None
    if task in PROMPT_MODEL_CLASSES:
        return PROMPT_MODEL_CLASSES[task]
    raise ConfigError(
        f"{config.peft_type} needs task_type set to one of {', '.join(PROMPT_TASKS)} (got {config.task_type}); "
        "it decides where the virtual tokens go."
    )


class PromptLearningModel(PeftModel):
    """A model with soft-prompt adapters (prompt tuning, P-tuning, prefix tuning / P-tuning v2).

    Build it with :func:`peftkit.get_peft_model` or :meth:`PeftModel.from_pretrained`. Several
    adapters can be loaded; :meth:`set_adapter` picks the one that runs; ``adapter_names=[...]`` in
    :meth:`forward` / :meth:`generate` gives each row its own (``"__base__"`` for none).
    """

    task: str = ""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        nn.Module.__init__(self)
        _check_new_name(adapter_name, [])
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._disabled = False
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.base_model = model
        self._causal = _is_causal(model)
        self.prompt_encoder = nn.ModuleDict()
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # -- structure ------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.base_model

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def word_embeddings(self) -> nn.Module:
        """The model's input embedding layer (where virtual tokens live for input prompts)."""
        emb = self._input_embeddings()
        if emb is None:
            raise PeftkitError(f"{type(self.base_model).__name__} has no input embeddings (get_input_embeddings()).")
        return emb

    def _input_embeddings(self) -> Optional[nn.Module]:
        get = getattr(self.base_model, "get_input_embeddings", None)
        if not callable(get):
            return None
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            return None
        if isinstance(emb, ModulesToSaveWrapper):
            emb = emb._active_module()
        return emb if isinstance(getattr(emb, "weight", None), torch.Tensor) else None

    def _layers(self) -> Iterator[tuple[str, engine.AdapterLayer]]:
        return engine.adapter_layers(self.base_model)

    @property
    def _device(self) -> torch.device:
        emb = self._input_embeddings()
        if emb is not None:
            return emb.weight.device
        return next(self.base_model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        emb = self._input_embeddings()
        if emb is not None and emb.weight.is_floating_point():
            return emb.weight.dtype
        for p in self.base_model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # -- configuration from the model ----------------------------------------------------------
    def _prepare(self, config: PromptLearningConfig) -> PromptLearningConfig:
        """Fill the model-derived fields (as Hugging Face PEFT) and check them against the model."""
        if not isinstance(config, PromptLearningConfig):
            raise ConfigError(f"{type(self).__name__} runs prompt-learning adapters; got {type(config).__name__}.")
        config = prepare_config(config, self.base_model)  # copy; adds classifier heads to modules_to_save
        if config.task_type is None:
            config.task_type = TaskType(self.task)
        elif str(config.task_type) != self.task:
            raise ConfigError(f"The adapter's task_type is {config.task_type} but this is a {self.task} model.")
        config.validate()  # again, with the task known (and fields set after the config was built)
        cfg = _text_config(self.base_model)
        if cfg is None:
            raise PeftkitError(f"{type(self.base_model).__name__} has no config; prompt-learning methods need a "
                               "transformers model.")
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2 if self.task == "SEQ_2_SEQ_LM" else 1
        is_prefix = isinstance(config, PrefixTuningConfig)
        if config.num_layers is None:
            names = ("num_decoder_layers", "decoder_layers") if is_prefix and self.task == "SEQ_2_SEQ_LM" else ()
            config.num_layers = _first_attr(cfg, names + ("num_hidden_layers", "num_layers", "n_layer"))
            if config.num_layers is None:
                raise ConfigError("Could not read the number of layers from the model config; set num_layers.")
        if config.num_attention_heads is None:
            config.num_attention_heads = _first_attr(
                cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
        if config.token_dim is None:
            config.token_dim = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
            if config.token_dim is None:
                raise ConfigError("Could not read the hidden size from the model config; set token_dim.")
            if is_prefix:
                heads = config.num_attention_heads
                head_dim = _first_attr(cfg, ("head_dim", "d_kv"))
                kv_heads = _first_attr(cfg, ("num_key_value_heads",))
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
            config.base_model_name_or_path = _name_or_path(self.base_model)
        if is_prefix:
            self._check_prefix(config, cfg)
        else:
            emb = self._input_embeddings()
            if emb is None:
                raise PeftkitError(
                    f"{config.peft_type} puts virtual tokens among the input embeddings, but "
                    f"{type(self.base_model).__name__} has no input embedding layer (get_input_embeddings() returns "
                    "none). Use a transformers model with token embeddings."
                )
            if emb.weight.shape[-1] != config.token_dim:
                raise ConfigError(f"token_dim={config.token_dim} does not match the model's embedding size "
                                  f"{emb.weight.shape[-1]}.")
        return config

    def _check_prefix(self, config: PrefixTuningConfig, cfg: Any) -> None:
        base = self.base_model
        if not _takes_cache(base):
            raise PeftkitError(
                f"Prefix tuning needs attention layers that take a key/value cache (past_key_values); the attention "
                f"of {type(base).__name__} takes none. Use prompt tuning or P-tuning for this model."
            )
        if config.token_dim % config.num_attention_heads:
            raise ConfigError(f"token_dim={config.token_dim} is not divisible by num_attention_heads="
                              f"{config.num_attention_heads}.")
        head_dim = _first_attr(cfg, ("head_dim", "d_kv"))
        kv_heads = _first_attr(cfg, ("num_key_value_heads",))
        heads = _first_attr(cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
        hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
        want_heads = kv_heads or heads
        want_dim = head_dim or (hidden // heads if hidden and heads else None)
        got_dim = config.token_dim // config.num_attention_heads
        if want_heads and want_dim and (config.num_attention_heads, got_dim) != (want_heads, want_dim):
            raise ConfigError(
                f"The prefix has {config.num_attention_heads} heads of size {got_dim} but the model's keys have "
                f"{want_heads} heads of size {want_dim}; leave token_dim/num_attention_heads unset to take them "
                "from the model."
            )
        names = ("num_decoder_layers", "decoder_layers") if self.task == "SEQ_2_SEQ_LM" else ()
        layers = _first_attr(cfg, names + ("num_hidden_layers", "num_layers", "n_layer"))
        if layers is not None and config.num_layers != layers:
            raise ConfigError(f"num_layers={config.num_layers} but the model has {layers} (decoder) layers.")
        if config.encoder_prefix:  # (the config's validate() refused it for other tasks)
            for module in self._encoder_attentions():
                heads = _first_attr(module, ("num_heads", "n_heads"))
                dim = _first_attr(module, ("head_dim", "key_value_proj_dim"))
                if heads and dim and (heads, dim) != (config.num_attention_heads, got_dim):
                    raise ConfigError(
                        f"The prefix has {config.num_attention_heads} heads of size {got_dim} but encoder layer "
                        f"{module.layer_idx} has {heads} heads of size {dim}; encoder_prefix needs encoder and decoder "
                        "attention of the same shape."
                    )

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a soft-prompt adapter (inactive unless it is the first); nothing changes on error."""
        _check_new_name(adapter_name, list(self.peft_config))
        if not isinstance(peft_config, PeftConfig):
            raise ConfigError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}.")
        if not peft_config.is_prompt_learning:
            raise ConfigError(f"A {peft_config.peft_type} adapter cannot be added to a prompt-learning model; wrap a "
                              "separate model for layer methods.")
        config = self._prepare(peft_config)
        if isinstance(config, PrefixTuningConfig) and self._gradient_checkpointing():
            raise PeftkitError(self._gc_message())
        # loaded for inference, an encoder holds its output only (as Hugging Face PEFT builds it)
        encoder = build_encoder(config, encoded=bool(config.inference_mode))
        if isinstance(config, PromptTuningConfig) and not config.inference_mode:
            self._init_prompt(encoder, config)
        encoder = encoder.to(self._device)
        if self.autocast_adapter_dtype and encoder.embedding.weight.dtype in (torch.float16, torch.bfloat16):
            encoder = encoder.float()
        added_heads = []
        try:
            if config.modules_to_save:
                found = engine.add_modules_to_save(self.base_model, config.modules_to_save, adapter_name)
                added_heads = found
                # task heads are optional (Hugging Face files list both "classifier" and "score")
                user = set(peft_config.modules_to_save or []) - set(TASK_HEADS.get(self.task, []))
                missing = [m for m in user if not any(k == m or k.endswith("." + m) for k in found)]
                if missing:
                    raise ConfigError(f"modules_to_save {missing} match no module of the model.")
        except Exception:
            if added_heads:
                self._remove_heads(adapter_name)
            raise
        self.prompt_encoder[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        if not self._active:
            self._active = [adapter_name]
        self._apply_active()

    def _init_prompt(self, encoder: nn.Module, config: PromptTuningConfig) -> None:
        init = PromptTuningInit(str(config.prompt_tuning_init))
        if init == PromptTuningInit.RANDOM:
            return
        emb = self.word_embeddings
        total = encoder.embedding.num_embeddings
        vocab = emb.weight.shape[0]
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, vocab, (total,), dtype=torch.long)
        else:
            ids = text_token_ids(config, total)
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ConfigError(f"The tokenizer {config.tokenizer_name_or_path!r} gives token ids {bad[:5]} outside "
                                  f"the model's vocabulary of {vocab}; use the model's own tokenizer.")
            ids = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            weight = emb(ids.to(emb.weight.device)).detach().clone().float()
        encoder.embedding.weight = nn.Parameter(weight.to(encoder.embedding.weight.device))

    def _remove_heads(self, name: str) -> None:
        for key, layer in reversed(list(self._layers())):
            if isinstance(layer, ModulesToSaveWrapper) and name in layer.adapter_names:
                layer.delete_adapter(name)
                if not layer.adapter_names:
                    parent, child = engine.get_submodule_parent(self.base_model, key)
                    setattr(parent, child, layer.original_module)

    def _remove_adapter_tensors(self, name: str) -> None:
        self._remove_heads(name)
        if name in self.prompt_encoder:
            del self.prompt_encoder[name]

    def _apply_active(self) -> None:
        """Freeze the base model; only the active adapter's encoder and heads train."""
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name in self._active and not self.peft_config[name].inference_mode)
        trainable = any(not self.peft_config[n].inference_mode for n in self._active)
        for _, layer in self._layers():
            layer.set_adapter(self._active, trainable=trainable)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_name`` the adapter that runs (and trains, unless loaded for inference)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise PeftkitError("Exactly one soft-prompt adapter is active at a time; to run several at once give each "
                               "row its own with adapter_names=[...].")
        if names[0] not in self.peft_config:
            raise AdapterNameError(f"Unknown adapter {names[0]!r}; loaded adapters: {list(self.peft_config)}.")
        self._active = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter: its encoder and its head copies."""
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"Unknown adapter {adapter_name!r}; loaded adapters: {list(self.peft_config)}.")
        self._forget_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the context the model runs without virtual tokens or head copies."""
        layers = [layer for _, layer in self._layers()]
        self._disabled = True
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for layer in layers:
                layer.disabled = False

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise MergeError("Soft prompts cannot be merged into the model weights: they are extra tokens, not weight "
                         "deltas.")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise MergeError("Soft prompts cannot be merged into the model weights; use unload() to get the base model.")

    def unmerge_adapter(self) -> None:
        """Nothing is ever merged for soft prompts."""

    def unload(self) -> nn.Module:
        """The base model without head wrappers (the prompts are simply dropped)."""
        return engine.unload(self.base_model, merge=False)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise PeftkitError("add_weighted_adapter combines LoRA adapters only.")

    # -- gradient checkpointing ------------------------------------------------------------------
    def _gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules())

    @staticmethod
    def _gc_message() -> str:
        return ("Prefix tuning does not work with gradient checkpointing: transformers drops the key/value cache "
                "(which holds the prefixes) inside checkpointed layers. Disable it for training "
                "(model.activation_checkpointing_disable()), or use prompt tuning / P-tuning, which work with it.")

    # -- the virtual tokens --------------------------------------------------------------------
    def _encoded(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s virtual tokens as used: (n, token_dim) or (n, 2·layers·token_dim)."""
        config = self.peft_config[name]
        out = encoded_output(self.prompt_encoder[name])
        return out[: config.num_virtual_tokens]

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The saved ``prompt_embeddings`` (Hugging Face name): the encoder output for every virtual token."""
        return encoded_output(self.prompt_encoder[adapter_name]).detach().cpu()

    def _row_names(self, adapter_names: Optional[Sequence[str]], batch: int) -> list[str]:
        if adapter_names is None:
            return [self._active[0]] * batch
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise PeftkitError("adapter_names must be a list with one adapter name per row.")
        engine.check_adapter_names(adapter_names, list(self.peft_config))
        if len(adapter_names) != batch:
            raise PeftkitError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; give "
                               "one name per row.")
        return list(adapter_names)

    def _virtual(self, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> _Virtual:
        """Build the virtual tokens of a batch whose row ``i`` uses adapter ``names[i]``."""
        slots = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        B = len(names)
        encoded = {n: self._encoded(n) for n in slots}
        is_kv = {n: self.peft_config[n].uses_kv_prefix for n in slots}
        lengths = {n: encoded[n].shape[0] for n in slots}
        input_counts = tuple(0 if n == BASE_ADAPTER or is_kv[n] else lengths[n] for n in names)
        prefix_counts = tuple(lengths[n] if n != BASE_ADAPTER and is_kv[n] else 0 for n in names)
        n_input = torch.tensor(input_counts, device=device)
        n_prefix = torch.tensor(prefix_counts, device=device)
        single = len(set(names)) == 1 and slots

        def block(kind_is_kv: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            members = [n for n in slots if is_kv[n] == kind_is_kv]
            if not members:
                return None, None
            width = max(lengths[n] for n in members)
            if single:
                t = encoded[members[0]].unsqueeze(0).expand(B, -1, -1)
                return t, torch.ones(B, width, dtype=torch.long, device=device)
            dim = encoded[members[0]].shape[-1]
            table = [encoded[members[0]].new_zeros(width, dim)]
            masks = [torch.zeros(width, dtype=torch.long, device=device)]
            index = {}
            for n in members:
                pad = width - lengths[n]
                index[n] = len(table)
                table.append(F.pad(encoded[n], (0, 0, pad, 0)))
                m = torch.zeros(width, dtype=torch.long, device=device)
                m[pad:] = 1
                masks.append(m)
            rows = torch.tensor([index.get(n, 0) for n in names], device=device)
            return torch.stack(table)[rows], torch.stack(masks)[rows]

        embeds, embeds_mask = block(False)
        if embeds is not None:
            embeds = embeds.to(device=device, dtype=dtype)
        z, kv_mask = block(True)
        out = _Virtual(embeds, embeds_mask, None, kv_mask, n_input, n_prefix, input_counts, prefix_counts)
        if z is not None:
            z = z.to(device=device, dtype=dtype)
            first = next(n for n in slots if is_kv[n])
            out.kv = self._split_prefix(z, first)
            on_encoder = {n for n in slots if is_kv[n] and getattr(self.peft_config[n], "encoder_prefix", False)}
            if on_encoder:
                out.enc_kv = self._split_prefix(z, first, encoder=True)
                rows = torch.tensor([n in on_encoder for n in names], device=device)
                out.enc_kv_mask = kv_mask * rows.unsqueeze(1).to(kv_mask.dtype)
                out.enc_full = out.uniform and all(n in on_encoder for n in names)
        return out

    def _split_prefix(self, z: torch.Tensor, name: str, encoder: bool = False
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``z`` (B, n, 2·layers·token_dim) -> per-layer (key, value), each (B, heads, n, head_dim).

        Encoder-decoder models: Hugging Face PEFT's duplicate-and-split gives decoder layer ``i``
        stored pair ``2i mod L`` for its self-attention (and ``2i+1 mod L`` for a cross-attention
        cache it then drops); ``encoder=True`` returns those odd pairs, one per encoder layer."""
        config = self.peft_config[name]
        B, n, _ = z.shape
        L, H = config.num_layers, config.num_attention_heads
        pkv = z.view(B, n, 2 * L, H, config.token_dim // H).permute(2, 0, 3, 1, 4)
        if encoder:
            sources = [(2 * j + 1) % L for j in range(len(self._encoder_attentions()))]
        elif self.task == "SEQ_2_SEQ_LM":
            sources = [(2 * i) % L for i in range(L)]
        else:
            sources = list(range(L))
        return [(pkv[2 * src].contiguous(), pkv[2 * src + 1].contiguous()) for src in sources]

    def _encoder_attentions(self) -> list[nn.Module]:
        """The encoder's self-attention modules in layer order (encoder-decoder models)."""
        return [module for module, _, _ in self._encoder_layers()]

    def _encoder_layers(self) -> list[tuple[nn.Module, inspect.Signature, Optional[str]]]:
        """Per encoder layer, found once: the innermost attention module for that ``layer_idx`` whose
        forward takes ``past_key_values``, its forward's signature and the name of its mask argument."""
        found = getattr(self, "_encoder_layer_cache", None)
        if found is not None:
            return found
        base = self.base_model
        encoder = base.get_encoder() if hasattr(base, "get_encoder") else None
        by_layer: dict[int, nn.Module] = {}
        if isinstance(encoder, nn.Module):
            for module in encoder.modules():
                name = type(module).__name__.lower()
                idx = getattr(module, "layer_idx", None)
                if ("attention" in name or "attn" in name) and isinstance(idx, int) \
                        and _accepts(module.forward, "past_key_values"):
                    by_layer[idx] = module  # modules() is pre-order: a later match is nested deeper
        if not by_layer or sorted(by_layer) != list(range(len(by_layer))):
            raise PeftkitError(
                f"encoder_prefix=True needs encoder self-attention layers that take past_key_values and know their "
                f"layer index; {type(base).__name__}'s encoder has none. Leave encoder_prefix unset to put the "
                "prefixes on the decoder only."
            )
        found = []
        for i in range(len(by_layer)):
            signature = inspect.signature(by_layer[i].forward)
            mask_arg = next((a for a in ("attention_mask", "mask") if a in signature.parameters), None)
            found.append((by_layer[i], signature, mask_arg))
        object.__setattr__(self, "_encoder_layer_cache", found)  # plain attribute, not submodules
        return found

    @contextlib.contextmanager
    def _encoder_prefixes(self, v: _Virtual) -> Iterator[None]:
        """While active, encoder self-attention layer ``j`` reads ``v.enc_kv[j]`` before its keys and
        values: a forward pre-hook passes a one-layer ``DynamicCache`` holding the prefix as the
        module's own ``past_key_values`` argument (built anew per call, so the encoder may run any
        number of times) and puts the prefix columns in front of its attention mask."""
        if v.enc_kv is None:
            yield
            return
        from transformers import DynamicCache

        handles = []

        def hook_for(signature: inspect.Signature, mask_arg: Optional[str], key: torch.Tensor, value: torch.Tensor
                     ) -> Any:
            def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                bound = signature.bind(*args, **kwargs)
                given = bound.arguments
                hidden = given.get("hidden_states", args[0] if args else None)
                if given.get("past_key_values") is not None or given.get("key_value_states") is not None:
                    raise PeftkitError("An encoder attention layer was called with a cache or as cross-attention; "
                                       "encoder_prefix cannot be applied to it.")
                if hidden is None or hidden.shape[0] != key.shape[0]:
                    raise PeftkitError("The encoder ran on a batch of another size than the prefixes were built for; "
                                       "pass the inputs to the PeftModel (forward or generate), not encoder_outputs.")
                cache = DynamicCache()
                cache.update(key.to(hidden.dtype), value.to(hidden.dtype), mod.layer_idx)
                given["past_key_values"] = cache
                if mask_arg is not None:
                    given[mask_arg] = _prefix_mask(given.get(mask_arg), v.enc_kv_mask, v.enc_full, hidden, mod)
                return bound.args, bound.kwargs

            return hook

        try:
            for (module, signature, mask_arg), (key, value) in zip(self._encoder_layers(), v.enc_kv):
                handles.append(module.register_forward_pre_hook(hook_for(signature, mask_arg, key, value),
                                                                with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        if self.task == "SEQ_2_SEQ_LM":
            self_attn = DynamicCache()
            for i, (k, v) in enumerate(kv):
                self_attn.update(k, v, i)
            return EncoderDecoderCache(self_attn, DynamicCache())
        cfg = getattr(self.base_model, "config", None)
        try:
            cache = DynamicCache(config=cfg)
        except Exception:  # configs transformers cannot read layer types from
            cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache

    def get_prompt(self, batch_size: int) -> Any:
        """The active adapter's virtual tokens for ``batch_size`` rows (Hugging Face name): prompts
        ``(batch, n, token_dim)`` for input methods, a transformers Cache for prefix tuning."""
        v = self._virtual([self._active[0]] * batch_size, self._device, self._dtype)
        return self._cache(v.kv) if v.kv is not None else v.embeds

    # -- positions ------------------------------------------------------------------------------
    def _positions(self, v: _Virtual, L: int, user: Optional[torch.Tensor], device: torch.device
                   ) -> Optional[torch.Tensor]:
        """Position ids of ``[prompt block; text]`` that give each row the positions it has alone."""
        if v.uniform and user is None:
            return None  # the model's default positions are already the single-adapter ones
        if not _accepts(self.base_model.forward, "position_ids"):
            if _is_relative(_text_config(self.base_model)):
                return None  # relative positions: left padding shifts nothing that matters
            raise PeftkitError(
                f"Rows with virtual tokens of different lengths need per-row position ids, which "
                f"{type(self.base_model).__name__} does not take; run rows with equally long prompts together."
            )
        B = v.n_input.shape[0]
        text = user.to(device) if user is not None else torch.arange(L, device=device).expand(B, L)
        text = text + (v.n_input + v.n_prefix).unsqueeze(1)
        if not v.n_embeds:
            return text
        Np = v.n_embeds
        prompt = (torch.arange(Np, device=device).unsqueeze(0) - (Np - v.n_input).unsqueeze(1)).clamp(min=0)
        return torch.cat([prompt, text], dim=1)

    # -- running --------------------------------------------------------------------------------
    def _check_training_prefix(self, v: _Virtual) -> None:
        if v.kv is not None and self.base_model.training and self._gradient_checkpointing():
            raise PeftkitError(self._gc_message())

    @staticmethod
    def _check_cache_used(cache: Any, n_before: int) -> None:
        if cache is not None and cache.get_seq_length() == n_before:
            raise PeftkitError("The model ignored past_key_values, so the prefixes had no effect: its attention "
                               "takes no key/value cache. Prefix tuning cannot be used with this model.")

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the model with the virtual tokens of the active adapter, or of ``adapter_names[i]`` for row ``i``."""
        if self._disabled:
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                     "labels": labels}
            return self.base_model(**{k: t for k, t in given.items() if t is not None}, **kwargs)
        if kwargs.get("past_key_values") is not None:
            raise PeftkitError("past_key_values cannot be passed to a prompt-learning model's forward: the virtual "
                               "tokens occupy the cache. Use generate() for decoding.")
        kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise PeftkitError("Pass exactly one of input_ids or inputs_embeds.")
        x = input_ids if input_ids is not None else inputs_embeds
        B, L = x.shape[:2]
        names = self._row_names(adapter_names, B)
        v = self._virtual(names, x.device, self._dtype if inputs_embeds is None else inputs_embeds.dtype)
        self._check_training_prefix(v)
        mixed = engine.mixed_batch(adapter_names) if adapter_names is not None else contextlib.nullcontext()
        with mixed:
            return self._run(v, input_ids, attention_mask, inputs_embeds, labels, kwargs)

    def _run(self, v: _Virtual, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
             inputs_embeds: Optional[torch.Tensor], labels: Optional[torch.Tensor], kwargs: dict) -> Any:
        x = input_ids if input_ids is not None else inputs_embeds
        B, L = x.shape[:2]
        device = x.device
        Np, Nk = v.n_embeds, v.n_kv
        # the virtual tokens' attention-mask columns: the encoder's (prompts) and, for encoder-decoder
        # models, the decoder's (prefixes); added when the caller gave a mask or rows differ
        enc_parts = [v.embeds_mask] if self.task == "SEQ_2_SEQ_LM" else [v.kv_mask, v.embeds_mask]
        enc_parts = [m for m in enc_parts if m is not None]
        if enc_parts and (attention_mask is not None or not v.uniform):
            user = attention_mask if attention_mask is not None else torch.ones(B, L, dtype=torch.long, device=device)
            attention_mask = torch.cat([m.to(user.dtype) for m in enc_parts] + [user], dim=1)
        if self.task == "SEQ_2_SEQ_LM" and Nk and (kwargs.get("decoder_attention_mask") is not None or not v.uniform):
            dec = kwargs.get("decoder_attention_mask")
            if dec is None:
                ref = next((t for t in (kwargs.get("decoder_input_ids"), kwargs.get("decoder_inputs_embeds"), labels)
                            if t is not None), None)
                if ref is None:
                    raise PeftkitError("Pass decoder_input_ids or labels with rows of different prefix lengths.")
                dec = torch.ones(B, ref.shape[1], dtype=torch.long, device=device)
            kwargs["decoder_attention_mask"] = torch.cat([v.kv_mask.to(dec.dtype), dec], dim=1)
        if self.task == "SEQ_2_SEQ_LM":
            self._check_decoder_prefix(v)
            if v.enc_kv is not None and kwargs.get("encoder_outputs") is not None:
                raise PeftkitError("encoder_outputs cannot be passed with an encoder_prefix adapter: the encoder must "
                                   "run with its prefixes. Pass input_ids (or inputs_embeds) instead.")
        else:
            position_ids = self._positions(v, L, kwargs.pop("position_ids", None), device)
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
        if Np:
            if inputs_embeds is None:
                inputs_embeds = self.word_embeddings(input_ids)
            inputs_embeds = torch.cat([v.embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            input_ids = None
            if labels is not None and self.task in ("CAUSAL_LM", "TOKEN_CLS"):
                labels = torch.cat([labels.new_full((B, Np), -100), labels], dim=1)
            if kwargs.get("token_type_ids") is not None:
                tt = kwargs["token_type_ids"]
                kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, Np), tt], dim=1)
        shift = None
        if Np and not v.uniform_input and (self.task == "SEQ_2_SEQ_LM" or not self._causal):
            # Bidirectional encoders read position 0 (BERT's pooler) or count positions from it (BART): lay
            # row i out as [P_i; x; padding] instead of [padding; P_i; x]; rotate the outputs back afterwards.
            shift = Np - v.n_input
            T = Np + L
            inputs_embeds = _roll(inputs_embeds, shift)
            attention_mask = torch.cat([attention_mask[:, :-T], _roll(attention_mask[:, -T:], shift)], dim=1)
            for key in ("position_ids", "token_type_ids"):
                if kwargs.get(key) is not None:
                    kwargs[key] = _roll(kwargs[key], shift)
            if labels is not None and labels.dim() == 2 and labels.shape[1] == T:
                labels = _roll(labels, shift)
        cache = self._cache(v.kv) if v.kv is not None else None
        if cache is not None:
            kwargs["past_key_values"] = cache
        if labels is not None:
            kwargs["labels"] = labels
        with self._encoder_prefixes(v):
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                  **kwargs)
        self._check_cache_used(cache, Nk)
        if shift is not None:
            out = self._unroll(out, -shift, Np + L)
        return out

    @staticmethod
    def _unroll(out: Any, shift: torch.Tensor, T: int) -> Any:
        """Rotate the per-token outputs (logits, hidden states) of a rolled batch back."""
        def fix(t: Any) -> Any:
            return _roll(t, shift) if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == T else t

        for key in ("logits", "last_hidden_state", "encoder_last_hidden_state"):
            if getattr(out, key, None) is not None:
                out[key] = fix(out[key])
        for key in ("hidden_states", "encoder_hidden_states"):
            if getattr(out, key, None) is not None:
                out[key] = tuple(fix(h) for h in out[key])
        return out

    def _check_decoder_prefix(self, v: _Virtual) -> None:
        if v.kv is not None and not v.uniform_prefix and not _is_relative(_text_config(self.base_model)):
            raise PeftkitError(
                f"{type(self.base_model).__name__}'s decoder counts positions from the cache length, so rows with "
                "prefixes of different lengths cannot be batched for it; run them in separate batches (or give the "
                "prefix adapters equal num_virtual_tokens)."
            )

    @staticmethod
    def _expand_size(model: nn.Module, kwargs: dict) -> int:
        """Rows generate() makes of each input row (beams / returned sequences), as transformers computes it."""
        gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1
        seqs = kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", 1) or 1
        return max(int(beams), int(seqs))

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """``generate`` with the active adapter's virtual tokens, or ``adapter_names[i]``'s for row ``i``."""
        base = self.base_model
        if not hasattr(base, "generate"):
            raise PeftkitError(f"{type(base).__name__} has no generate().")
        if self._disabled:
            return base.generate(*args, **kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise PeftkitError("Pass input_ids once (positionally or by name) and the rest by keyword.")
            kwargs["input_ids"] = args[0]
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise PeftkitError("generate() on a prompt-learning model needs input_ids.")
        for key in ("inputs_embeds", "past_key_values", "position_ids"):
            if kwargs.get(key) is not None:
                raise PeftkitError(f"generate() on a prompt-learning model does not take {key}: the virtual tokens are "
                                   "added to the cache and positions come from the attention mask.")
            kwargs.pop(key, None)
        B, L = input_ids.shape
        names = self._row_names(adapter_names, B)
        device = input_ids.device
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.long, device=device)
        mixed = engine.mixed_batch(adapter_names) if adapter_names is not None else contextlib.nullcontext()
        with torch.no_grad(), mixed:
            v = self._virtual(names, device, self._dtype)
            if self.task == "SEQ_2_SEQ_LM":
                return self._generate_seq2seq(v, input_ids, mask, kwargs)
            return self._generate_decoder(v, input_ids, mask, kwargs)

    def _generate_decoder(self, v: _Virtual, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> Any:
        base = self.base_model
        parts = [m for m in (v.kv_mask, v.embeds_mask) if m is not None]
        if not parts:  # every row runs the base model
            return base.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        cache = self._cache(v.kv) if v.kv is not None else self._cache([])
        if v.embeds is not None:  # the soft prompt's keys/values: run it through the model once
            pre_mask = torch.cat([m.to(mask.dtype) for m in parts], dim=1)
            pos = (pre_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -v.n_embeds:]
            extra = {"logits_to_keep": 1} if _accepts(base.forward, "logits_to_keep") else {}
            if _accepts(base.forward, "position_ids"):
                extra["position_ids"] = pos
            elif not v.uniform and not _is_relative(_text_config(base)):
                raise PeftkitError(f"{type(base).__name__} takes no position_ids; rows with prompts of different "
                                   "lengths cannot be batched for it.")
            base(inputs_embeds=v.embeds, attention_mask=pre_mask, past_key_values=cache, use_cache=True, **extra)
        expand = self._expand_size(base, kwargs)
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        full = torch.cat([m.to(mask.dtype) for m in parts] + [mask], dim=1)
        if cache.get_seq_length() != full.shape[1] - mask.shape[1]:
            raise PeftkitError("The model ignored past_key_values, so the virtual tokens would have no effect; "
                               "prompt-learning generation needs a model that takes a key/value cache.")
        return base.generate(input_ids=input_ids, attention_mask=full, past_key_values=cache, **kwargs)

    def _generate_seq2seq(self, v: _Virtual, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> Any:
        base = self.base_model
        B = input_ids.shape[0]
        self._check_decoder_prefix(v)
        if v.embeds is not None:
            embeds = torch.cat([v.embeds, self.word_embeddings(input_ids).to(v.embeds.dtype)], dim=1)
            enc_mask = torch.cat([v.embeds_mask.to(mask.dtype), mask], dim=1)
            if not v.uniform_input:  # the encoder reads [P_i; x; padding] (see _run)
                shift = v.embeds.shape[1] - v.n_input
                embeds, enc_mask = _roll(embeds, shift), _roll(enc_mask, shift)
            kwargs["inputs_embeds"] = embeds
            kwargs["attention_mask"] = enc_mask
        else:
            kwargs["input_ids"] = input_ids
            kwargs["attention_mask"] = mask
        if v.kv is not None:
            cache = self._cache(v.kv)
            expand = self._expand_size(base, kwargs)
            if expand > 1:
                cache.batch_repeat_interleave(expand)
            kwargs["past_key_values"] = cache
            if not v.uniform or kwargs.get("decoder_attention_mask") is not None:
                dec = kwargs.pop("decoder_attention_mask", None)
                if dec is None:
                    dec = torch.ones(B, 1, dtype=torch.long, device=input_ids.device)
                kwargs["decoder_attention_mask"] = torch.cat([v.kv_mask.to(dec.dtype), dec], dim=1)
        with self._encoder_prefixes(v):
            return base.generate(**kwargs)

    # -- saving and loading ---------------------------------------------------------------------
    def prompt_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The file tensors of ``adapter_name``: ``prompt_embeddings`` and ``base_model.<head>.*``."""
        out = {"prompt_embeddings": self.get_prompt_embedding_to_save(adapter_name)}
        for _, file_key, tensor in adapter_entries(self.base_model, adapter_name, prefix="base_model."):
            out[file_key] = tensor
        return out

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, revision: Optional[str] = None, **kwargs: Any) -> None:
        """As :meth:`PeftModel.load_adapter`; a local ``subfolder`` is joined to the path so that the
        encoder weights saved beside the adapter are found."""
        if subfolder and os.path.isdir(os.path.join(os.fspath(model_id), subfolder)):
            model_id, subfolder = os.path.join(os.fspath(model_id), subfolder), None
        super().load_adapter(model_id, adapter_name, is_trainable=is_trainable, subfolder=subfolder,
                             revision=revision, **kwargs)

    def _extra_files(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        encoder = self.prompt_encoder[name]
        if not getattr(encoder, "reparameterized", False):
            return {}
        return {ENCODER_WEIGHTS_NAME: {k: v.detach() for k, v in encoder.state_dict().items()}}

    def load_prompt_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor], *,
                               source: str = "state dict") -> None:
        """Load file tensors into ``adapter_name``; everything is checked before anything is copied.

        A reparameterized encoder (P-tuning, prefix projection) being loaded for training also reads
        its own weights from ``peftkit_prompt_encoder.safetensors`` beside the file when ``source`` is
        a folder; without them it trains the saved prompt directly (with a warning).
        """
        encoder = self.prompt_encoder[adapter_name]
        given = dict(state_dict)
        if "prompt_embeddings" not in given:
            raise CheckpointError(f"{source} has no 'prompt_embeddings' tensor; it is not a prompt-learning adapter "
                                  "(or it is truncated).")
        prompt = given.pop("prompt_embeddings")
        expected_shape = tuple(encoded_output(encoder).shape)
        if tuple(prompt.shape) != expected_shape:
            raise CheckpointError(
                f"{source}: prompt_embeddings has shape {tuple(prompt.shape)} but this adapter expects "
                f"{expected_shape}; the adapter was made for another model or config."
            )
        if not prompt.is_floating_point():
            raise CheckpointError(f"{source}: prompt_embeddings has dtype {prompt.dtype}, expected floating point.")
        heads = {fk[len("base_model."):] if fk.startswith("base_model.") else fk: t
                 for _, fk, t in adapter_entries(self.base_model, adapter_name, prefix="base_model.")}
        given = {k[len("base_model."):] if k.startswith("base_model.") else k: t for k, t in given.items()}
        for key, tensor in heads.items():
            if key not in given:
                raise CheckpointError(f"{source} has no tensor 'base_model.{key}' (a trained head); the file is "
                                      "incomplete or for another task.")
            if tuple(given[key].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{source}: 'base_model.{key}' has shape {tuple(given[key].shape)} but the model "
                                      f"expects {tuple(tensor.shape)}.")
        unexpected = sorted(set(given) - set(heads))
        if unexpected:
            warnings.warn(f"{source}: ignoring {len(unexpected)} tensors that match nothing of the adapter: "
                          f"{unexpected[:5]}", PeftkitWarning, stacklevel=3)
        encoder_weights, why = None, ""
        if getattr(encoder, "reparameterized", False):
            encoder_weights, why = self._read_encoder_weights(encoder, prompt, source)
        with torch.no_grad():
            if encoder_weights is not None:
                encoder.load_state_dict(encoder_weights)
            elif getattr(encoder, "reparameterized", False):
                warnings.warn(f"{source}: {why}; training continues on the saved prompt directly, without the "
                              "encoder's reparameterization.", PeftkitWarning, stacklevel=3)
                self._replace_with_encoded(adapter_name, prompt)
            else:
                encoder.embedding.weight.copy_(prompt.to(encoder.embedding.weight))
            for key, tensor in heads.items():
                tensor.copy_(given[key].to(device=tensor.device, dtype=tensor.dtype))

    def _read_encoder_weights(self, encoder: nn.Module, prompt: torch.Tensor, source: str
                              ) -> tuple[Optional[dict[str, torch.Tensor]], str]:
        """The encoder weights saved beside ``source`` if present and consistent with ``prompt``
        (else ``None`` and the reason)."""
        missing = f"no {ENCODER_WEIGHTS_NAME} beside it (Hugging Face PEFT saves only the encoded prompt)"
        if not os.path.isdir(source):
            return None, missing
        path = os.path.join(source, ENCODER_WEIGHTS_NAME)
        if not os.path.isfile(path):
            return None, missing
        weights = load_tensors(path)
        own = encoder.state_dict()
        if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
            return None, f"{ENCODER_WEIGHTS_NAME} does not fit this adapter's encoder"
        trial = copy.deepcopy(encoder)
        trial.load_state_dict(weights)
        trial.eval()
        with torch.no_grad():
            out = encoded_output(trial).float().cpu()
        ref = prompt.float().cpu()
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item())):
            return None, (f"{ENCODER_WEIGHTS_NAME} does not reproduce prompt_embeddings (the compatible file changed "
                          "after it was written)")
        return weights, ""

    def _replace_with_encoded(self, name: str, prompt: torch.Tensor) -> None:
        config = self.peft_config[name]
        old = self.prompt_encoder[name]
        new = build_encoder(config, encoded=True)
        new.embedding.weight.data = prompt.detach().to(device=old.embedding.weight.device, dtype=torch.float32).clone()
        self.prompt_encoder[name] = new
        self._apply_active()

    # -- interpretability -----------------------------------------------------------------------
    def nearest_tokens(self, adapter_name: Optional[str] = None, k: int = 5, tokenizer: Any = None
                       ) -> list[list[NearestToken]]:
        """For each virtual token of an input-prompt adapter, the ``k`` vocabulary tokens whose input
        embeddings are nearest by cosine similarity, best first.

        ``tokenizer`` (an object or a path; default: the config's ``tokenizer_name_or_path``) adds
        the token strings. Prefix-tuning adapters hold keys/values, not embeddings: PeftkitError.
        """
        name = adapter_name or self._active[0]
        if name not in self.peft_config:
            raise AdapterNameError(f"Unknown adapter {name!r}; loaded adapters: {list(self.peft_config)}.")
        config = self.peft_config[name]
        if config.uses_kv_prefix:
            raise PeftkitError(f"Adapter {name!r} is prefix tuning: its virtual tokens are per-layer keys and values, "
                               "not word embeddings, so they have no nearest vocabulary tokens.")
        if not isinstance(k, int) or k <= 0:
            raise PeftkitError(f"k must be a positive integer, got {k!r}.")
        vocab = self.word_embeddings.weight.detach().float()
        with torch.no_grad():
            prompt = self._encoded(name).detach().float().to(vocab.device)
        sims = F.normalize(prompt, dim=-1, eps=1e-12) @ F.normalize(vocab, dim=-1, eps=1e-12).T
        scores, ids = sims.topk(min(k, vocab.shape[0]), dim=-1)
        tok = tokenizer
        if tok is None and getattr(config, "tokenizer_name_or_path", None) and os.path.isdir(
                config.tokenizer_name_or_path):
            tok = config.tokenizer_name_or_path
        if isinstance(tok, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok)
        out = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            out.append([NearestToken(i, s, tok.convert_ids_to_tokens(i) if tok is not None else None)
                        for i, s in zip(row_ids, row_scores)])
        return out


def text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The token ids of ``prompt_tuning_init_text``, repeated or truncated to ``total`` (Hugging Face rule)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Could not load the tokenizer {config.tokenizer_name_or_path!r} for TEXT init: {exc}") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens with "
                          f"{config.tokenizer_name_or_path!r}.")
    if len(ids) < total:
        ids = ids * -(-total // len(ids))
    return ids[:total]


class PromptModelForCausalLM(PromptLearningModel, PeftModelForCausalLM):
    """Soft prompts for decoder language models: virtual tokens before the text, masked from the loss."""

    task = "CAUSAL_LM"


class PromptModelForSeq2SeqLM(PromptLearningModel, PeftModelForSeq2SeqLM):
    """Soft prompts for encoder-decoder models: input prompts on the encoder, prefixes on the decoder's
    self-attention (as Hugging Face PEFT) and, with ``encoder_prefix=True``, on the encoder's too."""

    task = "SEQ_2_SEQ_LM"


class PromptModelForSequenceClassification(PromptLearningModel, PeftModelForSequenceClassification):
    """Soft prompts for sequence classification; the ``classifier``/``score`` head trains in full."""

    task = "SEQ_CLS"


class PromptModelForTokenClassification(PromptLearningModel, PeftModelForTokenClassification):
    """Soft prompts for token classification; the head trains in full. Outputs include the virtual
    positions (labels are extended with -100)."""

    task = "TOKEN_CLS"


class PromptModelForFeatureExtraction(PromptLearningModel, PeftModelForFeatureExtraction):
    """Soft prompts for encoders producing features; outputs include the virtual positions."""

    task = "FEATURE_EXTRACTION"


PROMPT_MODEL_CLASSES: dict[str, type[PromptLearningModel]] = {
    "CAUSAL_LM": PromptModelForCausalLM,
    "SEQ_2_SEQ_LM": PromptModelForSeq2SeqLM,
    "SEQ_CLS": PromptModelForSequenceClassification,
    "TOKEN_CLS": PromptModelForTokenClassification,
    "FEATURE_EXTRACTION": PromptModelForFeatureExtraction,
}


__all__ = [
    "ENCODER_WEIGHTS_NAME",
    "NearestToken",
    "PROMPT_MODEL_CLASSES",
    "PromptLearningModel",
    "PromptModelForCausalLM",
    "PromptModelForFeatureExtraction",
    "PromptModelForSeq2SeqLM",
    "PromptModelForSequenceClassification",
    "PromptModelForTokenClassification",
    "prompt_model_class",
    "text_token_ids",
]
