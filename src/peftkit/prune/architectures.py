"""Where the attention heads and MLP channels of each supported architecture live in the weights.

Structured pruning removes *units*: a unit of attention is one head (GPT-2, BERT) or one key/value
group, i.e. a KV head with the ``num_attention_heads / num_key_value_heads`` query heads that read it
(Llama-style grouped-query attention); a unit of the MLP is one intermediate channel. A unit owns a
contiguous block of every weight it touches, described by a :class:`Slice`: unit ``u`` owns the
indices ``offset + u * block ... offset + (u + 1) * block - 1`` along the module's output features
(``"out"``: rows of an ``nn.Linear`` weight ``[out, in]``, columns of a transformers ``Conv1D``
weight ``[in, out]``, and the bias) or its input features (``"in"``). For example, with head size
``d`` and ``r`` query heads per KV head, Llama's group ``g`` owns rows ``g·r·d ... (g+1)·r·d - 1``
of ``q_proj``, rows ``g·d ... (g+1)·d - 1`` of ``k_proj`` and ``v_proj``, and the same columns of
``o_proj`` as of ``q_proj``'s rows; GPT-2's head ``h`` owns three blocks of ``c_attn``'s outputs
(query, key, value at offsets ``0``, ``E``, ``2E`` where ``E`` is the current attention width).

An :class:`Architecture` reads a layer's current units from its modules (so an already pruned layer
is described correctly), writes back the attributes the transformers attention code reads after a
layer shrank, and updates the model config where the config can express the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError

OUT, IN = "out", "in"


@dataclass(frozen=True)
class Slice:
    """Unit ``u`` owns indices ``offset + u*block ... offset + (u+1)*block - 1`` of module ``path``
    (relative to the layer) along ``axis`` (``"out"`` or ``"in"`` features)."""

    path: str
    axis: str
    offset: int
    block: int


@dataclass(frozen=True)
class UnitSpec:
    """The units of one layer: how many there are, the weight blocks each owns, and how many query
    heads one unit holds (the GQA group size; 1 for heads without grouping and for channels)."""

    count: int
    slices: tuple[Slice, ...]
    heads_per_unit: int = 1


def conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def weight_dim(module: nn.Module, axis: str) -> int:
    """The dimension of ``module.weight`` that indexes ``axis`` (Linear ``[out, in]``, Conv1D ``[in, out]``)."""
    transposed = type(module) is conv1d_class()
    return (1 if transposed else 0) if axis == OUT else (0 if transposed else 1)


def resize_attributes(module: nn.Module) -> None:
    """Set a linear module's size attributes from its (already shrunk) weight."""
    if type(module) is nn.Linear:
        module.out_features, module.in_features = module.weight.shape
    else:
        module.nx, module.nf = module.weight.shape


class Architecture:
    """How structured pruning reads and edits one model family. Subclasses fill the hooks."""

    name = ""
    model_types: tuple[str, ...] = ()

    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def heads(self, layer: nn.Module, config: Any) -> UnitSpec:
        raise NotImplementedError

    def channels(self, layer: nn.Module, config: Any) -> UnitSpec:
        raise NotImplementedError

    def expresses_heads(self, config: Any, kept: int) -> bool:
        """Whether ``config`` (config.json) can describe layers of ``kept`` attention units."""
        return False

    def set_heads(self, layer: nn.Module, kept: int, config: Any) -> None:
        """Write the attention attributes of ``layer`` after it kept ``kept`` units."""

    def set_channels(self, layer: nn.Module, kept: int) -> None:
        """Write the MLP attributes of ``layer`` after it kept ``kept`` channels."""

    def update_config(self, config: Any, heads: Optional[int], channels: Optional[int]) -> None:
        """Record ``heads`` attention units and ``channels`` MLP channels per layer in ``config``
        (None: unchanged); ``heads`` only when :meth:`expresses_heads`."""
        raise NotImplementedError

    def original_sizes(self, config: Any) -> dict[str, int]:
        """The per-layer sizes a model built from ``config`` has (before any shrinking)."""
        raise NotImplementedError

    def check_config(self, config: Any) -> None:
        """ConfigError for variants of the family that structured pruning does not handle."""


class LlamaArchitecture(Architecture):
    """LlamaForCausalLM and the other Llama heads: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``.
    A unit of attention is a whole KV group. The attention modules keep ``head_dim`` and the group size,
    so only the config changes: ``num_attention_heads``, ``num_key_value_heads`` and an explicit
    ``head_dim``, provided transformers accepts the result (``LlamaConfig`` requires ``hidden_size`` to be
    a multiple of ``num_attention_heads``, even with an explicit ``head_dim``); otherwise the config keeps
    the original head counts and the folder needs ``load_structured``."""

    name = "llama"
    model_types = ("llama",)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.layers)

    @staticmethod
    def _head_dim(config: Any) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def heads(self, layer: nn.Module, config: Any) -> UnitSpec:
        d = self._head_dim(config)
        r = config.num_attention_heads // config.num_key_value_heads
        count = layer.self_attn.k_proj.weight.shape[0] // d
        return UnitSpec(count, (Slice("self_attn.q_proj", OUT, 0, r * d), Slice("self_attn.k_proj", OUT, 0, d),
                                Slice("self_attn.v_proj", OUT, 0, d), Slice("self_attn.o_proj", IN, 0, r * d)), r)

    def channels(self, layer: nn.Module, config: Any) -> UnitSpec:
        count = layer.mlp.gate_proj.weight.shape[0]
        return UnitSpec(count, (Slice("mlp.gate_proj", OUT, 0, 1), Slice("mlp.up_proj", OUT, 0, 1),
                                Slice("mlp.down_proj", IN, 0, 1)))

    def set_channels(self, layer: nn.Module, kept: int) -> None:
        layer.mlp.intermediate_size = kept

    def expresses_heads(self, config: Any, kept: int) -> bool:
        r = config.num_attention_heads // config.num_key_value_heads
        return config.hidden_size % (kept * r) == 0

    def update_config(self, config: Any, heads: Optional[int], channels: Optional[int]) -> None:
        if heads is not None:
            config.head_dim = self._head_dim(config)
        if heads is not None and self.expresses_heads(config, heads):
            r = config.num_attention_heads // config.num_key_value_heads
            config.num_key_value_heads = heads
            config.num_attention_heads = heads * r
        if channels is not None:
            config.intermediate_size = channels

    def original_sizes(self, config: Any) -> dict[str, int]:
        return {"heads": config.num_key_value_heads, "channels": config.intermediate_size}

    def check_config(self, config: Any) -> None:
        if getattr(config, "pretraining_tp", 1) not in (None, 1):
            raise ConfigError("structured pruning of Llama needs pretraining_tp=1 (the sliced projections of "
                              "pretraining_tp>1 are not supported); set config.pretraining_tp = 1 first.")


class GPT2Architecture(Architecture):
    """GPT2LMHeadModel and the other GPT-2 heads: ``attn.c_attn`` (query, key and value side by side)
    and ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``, all transformers ``Conv1D``. GPT-2 derives its
    head size from ``n_embd // n_head``, so pruned heads are written on the attention modules
    (``num_heads``, ``split_size``) and recorded for :func:`~peftkit.prune.structured.load_structured`;
    the MLP width goes into ``n_inner``."""

    name = "gpt2"
    model_types = ("gpt2",)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.h)

    def heads(self, layer: nn.Module, config: Any) -> UnitSpec:
        attn = layer.attn
        d, width = attn.head_dim, attn.split_size
        return UnitSpec(width // d, (Slice("attn.c_attn", OUT, 0, d), Slice("attn.c_attn", OUT, width, d),
                                     Slice("attn.c_attn", OUT, 2 * width, d), Slice("attn.c_proj", IN, 0, d)))

    def channels(self, layer: nn.Module, config: Any) -> UnitSpec:
        return UnitSpec(layer.mlp.c_fc.weight.shape[1], (Slice("mlp.c_fc", OUT, 0, 1), Slice("mlp.c_proj", IN, 0, 1)))

    def set_heads(self, layer: nn.Module, kept: int, config: Any) -> None:
        layer.attn.num_heads = kept
        layer.attn.split_size = kept * layer.attn.head_dim

    def update_config(self, config: Any, heads: Optional[int], channels: Optional[int]) -> None:
        if channels is not None:
            config.n_inner = channels

    def original_sizes(self, config: Any) -> dict[str, int]:
        return {"heads": config.n_head, "channels": config.n_inner or 4 * config.n_embd}

    def check_config(self, config: Any) -> None:
        if getattr(config, "add_cross_attention", False):
            raise ConfigError("structured pruning of GPT-2 does not support cross-attention layers "
                              "(add_cross_attention=True).")


class BertArchitecture(Architecture):
    """BertModel, BertForSequenceClassification and the other BERT heads: ``attention.self.{query,key,
    value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``. BERT derives its head
    size from ``hidden_size / num_attention_heads``, so pruned heads are written on the attention
    modules (``num_attention_heads``, ``all_head_size``) and recorded for ``load_structured``; the MLP
    width goes into ``intermediate_size``."""

    name = "bert"
    model_types = ("bert",)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.encoder.layer)

    def heads(self, layer: nn.Module, config: Any) -> UnitSpec:
        attn = layer.attention.self
        d = attn.attention_head_size
        return UnitSpec(attn.query.weight.shape[0] // d,
                        (Slice("attention.self.query", OUT, 0, d), Slice("attention.self.key", OUT, 0, d),
                         Slice("attention.self.value", OUT, 0, d), Slice("attention.output.dense", IN, 0, d)))

    def channels(self, layer: nn.Module, config: Any) -> UnitSpec:
        return UnitSpec(layer.intermediate.dense.weight.shape[0],
                        (Slice("intermediate.dense", OUT, 0, 1), Slice("output.dense", IN, 0, 1)))

    def set_heads(self, layer: nn.Module, kept: int, config: Any) -> None:
        attn = layer.attention.self
        attn.num_attention_heads = kept
        attn.all_head_size = kept * attn.attention_head_size

    def update_config(self, config: Any, heads: Optional[int], channels: Optional[int]) -> None:
        if channels is not None:
            config.intermediate_size = channels

    def original_sizes(self, config: Any) -> dict[str, int]:
        return {"heads": config.num_attention_heads, "channels": config.intermediate_size}

    def check_config(self, config: Any) -> None:
        if getattr(config, "add_cross_attention", False):
            raise ConfigError("structured pruning of BERT does not support cross-attention layers "
                              "(add_cross_attention=True).")


ARCHITECTURES: tuple[Architecture, ...] = (LlamaArchitecture(), GPT2Architecture(), BertArchitecture())


def architecture_for(model_type: Any) -> Architecture:
    """The architecture of a transformers ``config.model_type`` (ConfigError when unsupported)."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in ARCHITECTURES for t in a.model_types)
    raise ConfigError(f"structured pruning supports the model types {known}, not {model_type!r}.")


def unit_indices(slices: tuple[Slice, ...], keep: list[int]) -> dict[tuple[str, str], torch.Tensor]:
    """The indices each (module path, axis) keeps when only the units ``keep`` (sorted) remain: the
    kept blocks of every slice of that module and axis, in the slices' order."""
    out: dict[tuple[str, str], list[torch.Tensor]] = {}
    units = torch.tensor(keep, dtype=torch.long)
    for s in slices:
        idx = (s.offset + units[:, None] * s.block + torch.arange(s.block)[None, :]).reshape(-1)
        out.setdefault((s.path, s.axis), []).append(idx)
    return {key: torch.cat(parts) for key, parts in out.items()}


def shrink_layer(layer: nn.Module, spec: UnitSpec, keep: list[int]) -> None:
    """Keep only units ``keep`` (sorted) of ``spec`` in ``layer``: every weight (and the bias of the
    output axis) is replaced by its kept rows/columns; sizes attributes of the linears follow."""
    for (path, axis), idx in unit_indices(spec.slices, keep).items():
        module = layer.get_submodule(path)
        dim = weight_dim(module, axis)
        w = module.weight
        idx = idx.to(w.device)
        module.weight = nn.Parameter(w.detach().index_select(dim, idx).contiguous(), requires_grad=w.requires_grad)
        if axis == OUT and module.bias is not None:
            b = module.bias
            module.bias = nn.Parameter(b.detach().index_select(0, idx).contiguous(), requires_grad=b.requires_grad)
        resize_attributes(module)
