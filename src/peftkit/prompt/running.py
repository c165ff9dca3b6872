"""Running a soft-prompt model: ``forward`` and ``generate`` with each row's virtual tokens.

Input prompts: causal-LM and token-classification labels get ``-100`` for the virtual positions,
``token_type_ids`` get type 0; outputs cover ``n + L`` positions, as in Hugging Face PEFT.
Encoder-decoder models get the prompt on the encoder. Bidirectional encoders such as BERT pool
position 0, so in a mixed batch of prompts of different lengths a row is fed as ``[P_i; x_i; pad]``
and the per-token outputs are rotated back to the ``[pad; P_i; x_i]`` layout. Positions come from
:func:`~peftkit.prompt.virtual.positions`; models that take no ``position_ids`` must use relative
positions (T5), otherwise a PeftkitError says so.

``generate`` prefills a cache: the prefix, or the base model's keys/values for the soft prompt,
then calls the model's own ``generate`` with ``past_key_values`` and the full attention mask, which
restarts from that cache. Position ids in ``generate`` come from the attention mask, so
left-padded batches generate what each row generates alone.

The functions take the prompt model (``peft``) and read its public state: ``peft_config``,
``prompt_encoder``, ``task``, ``base_model``, ``word_embeddings``, ``is_causal``, ``active_adapters``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..core.mixed import check_adapter_names, mixed_batch
from ..errors import AdapterNameError, PeftkitError
from .encoder_prefix import encoder_prefixes
from .introspect import accepts, is_relative, text_config
from .virtual import Virtual, build_virtual, make_cache, positions, roll

GC_MESSAGE = ("Prefix tuning does not work with gradient checkpointing: transformers drops the key/value cache "
              "(which holds the prefixes) inside checkpointed layers. Disable it for training "
              "(model.activation_checkpointing_disable()), or use prompt tuning / P-tuning, which work with it.")


def gradient_checkpointing(base: nn.Module) -> bool:
    """Whether gradient checkpointing is on in ``base``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def prompt_device(peft: nn.Module) -> torch.device:
    """Where the prompt model's virtual tokens go: its input embeddings' device."""
    emb = peft.input_embeddings()
    if emb is not None:
        return emb.weight.device
    return next(peft.base_model.parameters()).device


def prompt_dtype(peft: nn.Module) -> torch.dtype:
    """The dtype the virtual tokens are fed in: the input embeddings' (else the first float parameter's)."""
    emb = peft.input_embeddings()
    if emb is not None and emb.weight.is_floating_point():
        return emb.weight.dtype
    for p in peft.base_model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def row_names(peft: nn.Module, adapter_names: Optional[Sequence[str]], batch: int) -> list[str]:
    """The adapter of each row: ``adapter_names`` checked, or the active adapter for every row."""
    if adapter_names is None:
        if not peft.active_adapters:
            raise AdapterNameError("The model has no adapter (the last one was deleted); add one with add_adapter or "
                                   "load_adapter, or run the base model (get_base_model()).")
        return [peft.active_adapters[0]] * batch
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise PeftkitError("adapter_names must be a list with one adapter name per row.")
    check_adapter_names(adapter_names, list(peft.peft_config))
    if len(adapter_names) != batch:
        raise PeftkitError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows; give "
                           "one name per row.")
    return list(adapter_names)


def _check_training_prefix(base: nn.Module, v: Virtual) -> None:
    if v.kv is not None and base.training and gradient_checkpointing(base):
        raise PeftkitError(GC_MESSAGE)


def _check_cache_used(cache: Any, n_before: int) -> None:
    if cache is not None and cache.get_seq_length() == n_before:
        raise PeftkitError("The model ignored past_key_values, so the prefixes had no effect: its attention "
                           "takes no key/value cache. Prefix tuning cannot be used with this model.")


def forward(peft: nn.Module, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
            inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
            adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
    """``peft``'s forward with the virtual tokens of the active adapter, or of ``adapter_names[i]`` for row
    ``i`` (adapters enabled: the model calls its base directly when they are disabled)."""
    if kwargs.get("past_key_values") is not None:
        raise PeftkitError("past_key_values cannot be passed to a prompt-learning model's forward: the virtual "
                           "tokens occupy the cache. Use generate() for decoding.")
    kwargs.pop("past_key_values", None)
    if (input_ids is None) == (inputs_embeds is None):
        raise PeftkitError("Pass exactly one of input_ids or inputs_embeds.")
    x = input_ids if input_ids is not None else inputs_embeds
    B, L = x.shape[:2]
    names = row_names(peft, adapter_names, B)
    v = build_virtual(peft, names, x.device, prompt_dtype(peft) if inputs_embeds is None else inputs_embeds.dtype)
    _check_training_prefix(peft.base_model, v)
    mixed = mixed_batch(adapter_names) if adapter_names is not None else contextlib.nullcontext()
    with mixed:
        return _run(peft, v, input_ids, attention_mask, inputs_embeds, labels, kwargs)


def _run(peft: nn.Module, v: Virtual, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
         inputs_embeds: Optional[torch.Tensor], labels: Optional[torch.Tensor], kwargs: dict) -> Any:
    x = input_ids if input_ids is not None else inputs_embeds
    B, L = x.shape[:2]
    device = x.device
    Np, Nk = v.n_embeds, v.n_kv
    # the virtual tokens' attention-mask columns: the encoder's (prompts) and, for encoder-decoder
    # models, the decoder's (prefixes); added when the caller gave a mask or rows differ
    enc_parts = [v.embeds_mask] if peft.task == "SEQ_2_SEQ_LM" else [v.kv_mask, v.embeds_mask]
    enc_parts = [m for m in enc_parts if m is not None]
    if enc_parts and (attention_mask is not None or not v.uniform):
        user = attention_mask if attention_mask is not None else torch.ones(B, L, dtype=torch.long, device=device)
        attention_mask = torch.cat([m.to(user.dtype) for m in enc_parts] + [user], dim=1)
    if peft.task == "SEQ_2_SEQ_LM" and Nk and (kwargs.get("decoder_attention_mask") is not None or not v.uniform):
        dec = kwargs.get("decoder_attention_mask")
        if dec is None:
            ref = next((t for t in (kwargs.get("decoder_input_ids"), kwargs.get("decoder_inputs_embeds"), labels)
                        if t is not None), None)
            if ref is None:
                raise PeftkitError("Pass decoder_input_ids or labels with rows of different prefix lengths.")
            dec = torch.ones(B, ref.shape[1], dtype=torch.long, device=device)
        kwargs["decoder_attention_mask"] = torch.cat([v.kv_mask.to(dec.dtype), dec], dim=1)
    if peft.task == "SEQ_2_SEQ_LM":
        _check_decoder_prefix(peft.base_model, v)
        if v.enc_kv is not None and kwargs.get("encoder_outputs") is not None:
            raise PeftkitError("encoder_outputs cannot be passed with an encoder_prefix adapter: the encoder must "
                               "run with its prefixes. Pass input_ids (or inputs_embeds) instead.")
    else:
        position_ids = positions(peft.base_model, v, L, kwargs.pop("position_ids", None), device)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
    if Np:
        if inputs_embeds is None:
            inputs_embeds = peft.word_embeddings(input_ids)
        inputs_embeds = torch.cat([v.embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)
        input_ids = None
        if labels is not None and peft.task in ("CAUSAL_LM", "TOKEN_CLS"):
            labels = torch.cat([labels.new_full((B, Np), -100), labels], dim=1)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, Np), tt], dim=1)
    shift = None
    if Np and not v.uniform_input and (peft.task == "SEQ_2_SEQ_LM" or not peft.is_causal):
        # Bidirectional encoders read position 0 (BERT's pooler) or count positions from it (BART): lay
        # row i out as [P_i; x; padding] instead of [padding; P_i; x]; rotate the outputs back afterwards.
        shift = Np - v.n_input
        T = Np + L
        inputs_embeds = roll(inputs_embeds, shift)
        attention_mask = torch.cat([attention_mask[:, :-T], roll(attention_mask[:, -T:], shift)], dim=1)
        for key in ("position_ids", "token_type_ids"):
            if kwargs.get(key) is not None:
                kwargs[key] = roll(kwargs[key], shift)
        if labels is not None and labels.dim() == 2 and labels.shape[1] == T:
            labels = roll(labels, shift)
    cache = make_cache(peft.base_model, peft.task, v.kv) if v.kv is not None else None
    if cache is not None:
        kwargs["past_key_values"] = cache
    if labels is not None:
        kwargs["labels"] = labels
    with encoder_prefixes(peft.base_model, v.enc_kv, v.enc_kv_mask, v.enc_full):
        out = peft.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              **kwargs)
    _check_cache_used(cache, Nk)
    if shift is not None:
        out = _unroll(out, -shift, Np + L)
    return out


def _unroll(out: Any, shift: torch.Tensor, T: int) -> Any:
    """Rotate the per-token outputs (logits, hidden states) of a rolled batch back."""
    def fix(t: Any) -> Any:
        return roll(t, shift) if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == T else t

    for key in ("logits", "last_hidden_state", "encoder_last_hidden_state"):
        if getattr(out, key, None) is not None:
            out[key] = fix(out[key])
    for key in ("hidden_states", "encoder_hidden_states"):
        if getattr(out, key, None) is not None:
            out[key] = tuple(fix(h) for h in out[key])
    return out


def _check_decoder_prefix(base: nn.Module, v: Virtual) -> None:
    if v.kv is not None and not v.uniform_prefix and not is_relative(text_config(base)):
        raise PeftkitError(
            f"{type(base).__name__}'s decoder counts positions from the cache length, so rows with "
            "prefixes of different lengths cannot be batched for it; run them in separate batches (or give the "
            "prefix adapters equal num_virtual_tokens)."
        )


def _expand_size(model: nn.Module, kwargs: dict) -> int:
    """Rows generate() makes of each input row (beams / returned sequences), as transformers computes it."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(gc, "num_beams", 1) or 1
    seqs = kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", 1) or 1
    return max(int(beams), int(seqs))


def generate(peft: nn.Module, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
    """``peft``'s ``generate`` with the active adapter's virtual tokens, or ``adapter_names[i]``'s for row ``i``
    (adapters enabled)."""
    base = peft.base_model
    if not hasattr(base, "generate"):
        raise PeftkitError(f"{type(base).__name__} has no generate().")
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
    names = row_names(peft, adapter_names, B)
    device = input_ids.device
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.long, device=device)
    # generate() expands rows (beams, num_return_sequences): layers may see a multiple of the names
    mixed = mixed_batch(adapter_names, expand=True) if adapter_names is not None else contextlib.nullcontext()
    with torch.no_grad(), mixed:
        v = build_virtual(peft, names, device, prompt_dtype(peft))
        if peft.task == "SEQ_2_SEQ_LM":
            return _generate_seq2seq(peft, v, input_ids, mask, kwargs)
        return _generate_decoder(peft, v, input_ids, mask, kwargs)


def _generate_decoder(peft: nn.Module, v: Virtual, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> Any:
    base = peft.base_model
    parts = [m for m in (v.kv_mask, v.embeds_mask) if m is not None]
    if not parts:  # every row runs the base model
        return base.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    cache = make_cache(peft.base_model, peft.task, v.kv) if v.kv is not None else make_cache(peft.base_model, peft.task, [])
    if v.embeds is not None:  # the soft prompt's keys/values: run it through the model once
        pre_mask = torch.cat([m.to(mask.dtype) for m in parts], dim=1)
        pos = (pre_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -v.n_embeds:]
        extra = {"logits_to_keep": 1} if accepts(base.forward, "logits_to_keep") else {}
        if accepts(base.forward, "position_ids"):
            extra["position_ids"] = pos
        elif not v.uniform and not is_relative(text_config(base)):
            raise PeftkitError(f"{type(base).__name__} takes no position_ids; rows with prompts of different "
                               "lengths cannot be batched for it.")
        base(inputs_embeds=v.embeds, attention_mask=pre_mask, past_key_values=cache, use_cache=True, **extra)
    expand = _expand_size(base, kwargs)
    if expand > 1:
        cache.batch_repeat_interleave(expand)
    full = torch.cat([m.to(mask.dtype) for m in parts] + [mask], dim=1)
    if cache.get_seq_length() != full.shape[1] - mask.shape[1]:
        raise PeftkitError("The model ignored past_key_values, so the virtual tokens would have no effect; "
                           "prompt-learning generation needs a model that takes a key/value cache.")
    return base.generate(input_ids=input_ids, attention_mask=full, past_key_values=cache, **kwargs)


def _generate_seq2seq(peft: nn.Module, v: Virtual, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> Any:
    base = peft.base_model
    B = input_ids.shape[0]
    _check_decoder_prefix(peft.base_model, v)
    if v.embeds is not None:
        embeds = torch.cat([v.embeds, peft.word_embeddings(input_ids).to(v.embeds.dtype)], dim=1)
        enc_mask = torch.cat([v.embeds_mask.to(mask.dtype), mask], dim=1)
        if not v.uniform_input:  # the encoder reads [P_i; x; padding] (see _run)
            shift = v.embeds.shape[1] - v.n_input
            embeds, enc_mask = roll(embeds, shift), roll(enc_mask, shift)
        kwargs["inputs_embeds"] = embeds
        kwargs["attention_mask"] = enc_mask
    else:
        kwargs["input_ids"] = input_ids
        kwargs["attention_mask"] = mask
    if v.kv is not None:
        cache = make_cache(peft.base_model, peft.task, v.kv)
        expand = _expand_size(base, kwargs)
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        kwargs["past_key_values"] = cache
        if not v.uniform or kwargs.get("decoder_attention_mask") is not None:
            dec = kwargs.pop("decoder_attention_mask", None)
            if dec is None:
                dec = torch.ones(B, 1, dtype=torch.long, device=input_ids.device)
            kwargs["decoder_attention_mask"] = torch.cat([v.kv_mask.to(dec.dtype), dec], dim=1)
    with encoder_prefixes(peft.base_model, v.enc_kv, v.enc_kv_mask, v.enc_full):
        return base.generate(**kwargs)


__all__ = ["GC_MESSAGE", "forward", "generate", "gradient_checkpointing", "prompt_device", "prompt_dtype", "row_names"]
