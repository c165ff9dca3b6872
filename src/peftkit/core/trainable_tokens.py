"""Trainable tokens: chosen rows of an embedding table (and of a tied output head) trained in place.

For a table ``E`` (num_embeddings x dim) and an adapter ``a`` with token indices ``I_a`` (n of
them) the adapter holds ``delta_a`` (n x dim), initialised to ``E[I_a]`` (a no-op start)::

    E'_a = E with rows I_a replaced by delta_a         y = E'_a[x]           (nn.Embedding)
    W'_a = W with rows I_a replaced by delta_a         y = x W'_a^T + b      (tied nn.Linear head)

Rows are *replaced*, not added to: the value of a token is the adapter's, whatever the base row
holds (a resized vocabulary re-initialised with new random rows still gets the trained values).
The forward never copies the table: the base output is computed and the positions of the chosen
tokens are overwritten (embeddings) or the chosen output columns recomputed (heads). Several active
adapters must have disjoint indices. Merging writes ``delta`` into the rows; unmerging writes back
the rows as they were when the adapter was created (``trainable_tokens_original``).

Two layouts, as Hugging Face PEFT: :class:`TrainableTokensLayer` (the TRAINABLE_TOKENS method: in
memory ``embed_tokens.trainable_tokens_delta.<name>``, in the file ``embed_tokens.trainable_tokens_delta``)
and :class:`TrainableTokensWrapper` (LoRA's ``trainable_token_indices``: ``embed_tokens.token_adapter.
trainable_tokens_delta``). A layer over an output head whose weight is the embedding's (tied
embeddings) is *tied* to the embedding's layer: it shares its tensors and follows it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError, MergeError, PeftkitError, TargetError
from .layer import AdapterLayer
from .modules_to_save import AuxiliaryTrainingWrapper
from .mixed import MixedBatch


class BufferDict(nn.Module):
    """Adapter name -> tensor, held as non-persistent buffers (they move with ``.to()``, are not saved)."""

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self) -> list[str]:
        return list(self._buffers)


def check_token_indices(indices: Any, rows: int, where: str) -> list[int]:
    """``indices`` as a list of distinct ints in ``[0, rows)``; ConfigError naming ``where`` otherwise."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ConfigError(f"{where}: token indices must be a non-empty list of integers, got {indices!r}.")
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows]
    if bad:
        raise ConfigError(f"{where}: token indices {bad[:5]} are out of range; the layer has {rows} tokens "
                          f"(valid indices 0..{rows - 1}). Resize the embeddings first to add new tokens.")
    if len(set(indices)) != len(indices):
        dup = sorted({i for i in indices if indices.count(i) > 1})
        raise ConfigError(f"{where}: token indices {dup} are given more than once.")
    return list(indices)


class TrainableTokensLayer(AdapterLayer):
    """Trainable rows of an ``nn.Embedding`` (or of a tied ``nn.Linear`` output head); see the module doc.

    ``tied_to``: the layer of the input embedding whose weight this layer's base shares; this layer
    then holds no tensors of its own (it shares that layer's) and only follows it.
    """

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TrainableTokensLayer"] = None) -> None:
        self._init_base(base_layer)
        base = self.get_base_layer()
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TargetError(f"Trainable tokens need an nn.Embedding (or a tied nn.Linear output head), got "
                              f"{type(base).__name__}; target the model's embedding layer.")
        self.num_tokens = base.num_embeddings if isinstance(base, nn.Embedding) else base.out_features
        self._tied: list[TrainableTokensLayer] = []  # a list: not a submodule
        self._followers: list[TrainableTokensLayer] = []
        if tied_to is None:
            self._set_storage(nn.ParameterDict(), BufferDict(), {})
        else:
            self.tie_to(tied_to)

    # -- layout (the wrapper subclass keeps the tensors one module further down) ----------------
    def _init_base(self, base_layer: nn.Module) -> None:
        AdapterLayer.__init__(self, base_layer)

    def _set_storage(self, delta: nn.ParameterDict, original: BufferDict, indices: dict[str, list[int]]) -> None:
        self.trainable_tokens_delta = delta
        self.trainable_tokens_original = original
        self.token_indices = indices

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        """The layer this one follows (tied embeddings), or None."""
        return self._tied[0] if self._tied else None

    def tie_to(self, source: "TrainableTokensLayer") -> None:
        """Share ``source``'s tensors from now on (this layer's own adapters are dropped)."""
        if source.num_tokens != self.num_tokens:
            raise TargetError(f"Cannot tie trainable tokens of a layer with {self.num_tokens} rows to one with "
                              f"{source.num_tokens}.")
        self._tied = [source]
        source._followers.append(self)
        self._set_storage(source.trainable_tokens_delta, source.trainable_tokens_original, source.token_indices)

    def tied_layers(self) -> list[AdapterLayer]:
        return [*self._tied, *self._followers]

    # -- adapters -----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, key: str) -> None:
        self.update_tokens(adapter_name, config.token_indices, getattr(config, "init_weights", True), key)

    def update_tokens(self, name: str, indices: Sequence[int], init_weights: bool = True, key: str = "") -> None:
        """Create adapter ``name`` for rows ``indices`` (a tied layer only checks: it follows its source)."""
        indices = check_token_indices(indices, self.num_tokens, key or type(self).__name__)
        if self.tied_adapter is not None:
            if name not in self.token_indices:
                raise TargetError(f"{key}: this layer follows the input embedding's trainable tokens; adapter "
                                  f"{name!r} is not there.")
            return
        if self.merged:
            raise MergeError(f"{key}: adapter(s) {self.merged_adapters} are merged; unmerge before adding another.")
        weight = self.get_base_layer().weight
        with torch.no_grad():
            original = weight[torch.tensor(indices, device=weight.device)].detach().clone()
            values = original.clone() if init_weights else torch.randn_like(original)
        self.token_indices[name] = indices
        self.trainable_tokens_original[name] = original
        self.trainable_tokens_delta[name] = nn.Parameter(values)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into {type(self).__name__}; unmerge it before deleting.")
        for container in (self.trainable_tokens_delta, self.trainable_tokens_original, self.token_indices):
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_param_items(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        if name in self.trainable_tokens_delta and self.saves_tensors():
            yield f"{self._prefix}trainable_tokens_delta.{name}", self.trainable_tokens_delta[name]

    _prefix = ""

    def saves_tensors(self) -> bool:
        """Whether this layer's tensors go into the file (PEFT's method saves the tied head's copy too)."""
        return True

    # -- forward ------------------------------------------------------------------------------
    def _rows(self, names: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of the adapters ``names`` (disjoint indices), sorted by index."""
        check_disjoint(self.token_indices, names)
        idx = torch.tensor([i for n in names for i in self.token_indices[n]], device=device)
        values = torch.cat([self.trainable_tokens_delta[n] for n in names]) if len(names) > 1 \
            else self.trainable_tokens_delta[names[0]]
        idx, order = idx.sort()
        return idx, values.index_select(0, order)

    def _replace(self, x: torch.Tensor, out: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The base output ``out`` of input ``x`` with the rows of ``names`` replaced (the class math)."""
        base = self.get_base_layer()
        idx, values = self._rows(names, out.device)
        if isinstance(base, nn.Linear):  # tied head: recompute the logits of the chosen tokens
            bias = base.bias.index_select(0, idx) if base.bias is not None else None
            cols = nn.functional.linear(x.to(values.dtype), values, None if bias is None else bias.to(values.dtype))
            return out.index_copy(-1, idx, cols.to(out.dtype))
        if base.padding_idx is not None:  # as F.embedding: no gradient for the padding row
            values = torch.where((idx == base.padding_idx).unsqueeze(1), values.detach(), values)
        pos = torch.searchsorted(idx, x).clamp_(max=idx.numel() - 1)
        hit = idx[pos] == x
        rows = values[pos]
        scale = getattr(base, "embed_scale", None)
        if scale is not None:
            rows = rows * scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else rows * scale
        return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)

    def _active_names(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.trainable_tokens_delta]

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        names = self._active_names()
        if self.merged or not names:
            return out
        return self._replace(x, out, names)

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: MixedBatch) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        slots = tuple(self.trainable_tokens_delta.keys())
        idx = mixed.index(slots, x.device, x.shape[0])
        for slot in torch.unique(idx).tolist():
            if slot == 0:
                continue
            rows = (idx == slot).nonzero().squeeze(1)
            part = self._replace(x.index_select(0, rows), out.index_select(0, rows), [slots[slot - 1]])
            out = out.index_copy(0, rows, part)
        return out

    # -- merging ------------------------------------------------------------------------------
    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Adapters merged together (and with those merged already) must have disjoint indices."""
        todo = self.adapters_to_merge(adapter_names)
        try:
            check_disjoint(self.token_indices, [*self.merged_adapters, *todo])
        except PeftkitError as exc:
            raise MergeError(str(exc)) from None
        super().check_merge(adapter_names, safe_merge)

    def _write_rows(self, rows: torch.Tensor, name: str) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight.index_copy_(0, index, rows.detach().to(device=weight.device, dtype=weight.dtype))

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        delta = self.trainable_tokens_delta[name]
        if safe_merge and not torch.isfinite(delta).all():
            raise MergeError(f"Adapter {name!r} has NaN/inf values; the adapter is broken. Nothing was merged.")
        self._write_rows(delta, name)

    def _unmerge_one(self, name: str) -> None:
        self._write_rows(self.trainable_tokens_original[name], name)


def check_disjoint(token_indices: dict[str, list[int]], names: Sequence[str]) -> None:
    """PeftkitError if two of the adapters ``names`` replace the same token."""
    seen: dict[int, str] = {}
    for name in dict.fromkeys(names):
        for i in token_indices.get(name, ()):
            if i in seen:
                raise PeftkitError(f"Trainable-token adapters {seen[i]!r} and {name!r} both replace token {i}; adapters "
                                   "used (or merged) together need disjoint token indices.")
            seen[i] = name


class TokenAdapter(nn.Module):
    """The ``token_adapter`` submodule of a :class:`TrainableTokensWrapper` (holds its base and tensors)."""


class TrainableTokensWrapper(TrainableTokensLayer):
    """LoRA's ``trainable_token_indices`` on a layer: :class:`TrainableTokensLayer` with the tensors one
    module down (``embed_tokens.token_adapter.trainable_tokens_delta``), Hugging Face PEFT's layout.
    A wrapper tied to the input embedding's saves nothing (that one holds the tensors)."""

    _prefix = "token_adapter."

    def _init_base(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        self.token_adapter = TokenAdapter()
        self.token_adapter.base_layer = base_layer
        self.active_adapters = []
        self.merged_adapters = []
        self.disabled = False

    def _set_storage(self, delta: nn.ParameterDict, original: BufferDict, indices: dict[str, list[int]]) -> None:
        self.token_adapter.trainable_tokens_delta = delta
        self.token_adapter.trainable_tokens_original = original
        self.token_adapter.token_indices = indices

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.token_adapter.base_layer

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return self.token_adapter.trainable_tokens_delta

    @property
    def trainable_tokens_original(self) -> BufferDict:
        return self.token_adapter.trainable_tokens_original

    @property
    def token_indices(self) -> dict[str, list[int]]:
        return self.token_adapter.token_indices

    def saves_tensors(self) -> bool:
        return self.tied_adapter is None

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """File key -> in-memory key (transformers' ``load_adapter``); a tied wrapper loads nothing."""
        if not self.saves_tensors() or adapter_name not in self.trainable_tokens_delta:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}


AuxiliaryTrainingWrapper.register(TrainableTokensWrapper)


__all__ = ["BufferDict", "TokenAdapter", "TrainableTokensLayer", "TrainableTokensWrapper", "check_disjoint",
           "check_token_indices"]
