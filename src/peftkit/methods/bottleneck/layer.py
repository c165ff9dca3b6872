"""Bottleneck adapters: Houlsby (two per block), Pfeiffer (one, after the FFN) and parallel adapters.

The adapter module of Houlsby et al. (2019), on a hidden state ``h`` of size ``d``::

    A(h) = s · U f(D LN(h)),      D: Linear(d, m),  U: Linear(m, d),  m = d // reduction_factor

with ``f`` the non-linearity, ``LN`` an optional LayerNorm on the adapter input, ``s`` a scale and
``U`` zero-initialised, so every placement starts as a no-op. Placements, done by wrapping modules of
the model (never by copying its code):

* ``"houlsby"``: after the attention output projection and after the feed-forward output projection,
  sequentially, inside the residual branch: the wrapped module ``M`` computes ``y = M(x) + A(M(x))``.
* ``"pfeiffer"`` (Pfeiffer et al. 2021): the same, after the feed-forward output projection only.
* ``"parallel"`` (He et al. 2022): beside the feed-forward block, reading its input:
  ``y = FFN(x) + A(x)`` with ``s = 4`` by default. For blocks that add the residual themselves
  before their layer norm (BERT's ``BertOutput(h, r) = LN(dense(h) + r)``), ``parallel_input=
  "residual"`` feeds the adapter the residual ``r`` and calls ``M(h, r + A(r))``, which is the same
  ``r + FFN(r) + A(r)`` before the norm.

Placement is found from module names: ``attention_output_modules``, ``ffn_output_modules`` and
``parallel_modules`` (names as ``target_modules``: exact or dotted suffix, or one regex), with
defaults for Llama-style models, GPT-2, BERT/RoBERTa and T5. Several active adapters on one module add
their outputs. A mixed batch gathers every row's D and U from the stacked (rank-padded) weights and
runs two batched matmuls. Not mergeable: ``f`` is non-linear, so no change of the base weights
expresses the adapter. File keys: ``<module>.adapter_down.weight``, ``.adapter_up.weight`` (and
biases, ``adapter_ln.*``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...core.kernels import dropout_p, rowwise_dropout
from ...core.layer import AdapterLayer
from ...core.memory import check_new_tensors
from ...core.mixed import MixedBatch, current_mixed_batch
from ...errors import ConfigError, PeftkitError, TargetError
from .config import BottleneckConfig, hidden_size

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on one module (see the module doc for the math).

    ``placement``: "output" ``y = M(x) + Σ_a A_a(M(x))``; "input" ``y = M(x) + Σ_a A_a(x)``;
    "residual" ``y = M(h, r + Σ_a A_a(r))``. Per adapter: ``adapter_down[a]`` Linear(d, m),
    ``adapter_up[a]`` Linear(m, d), optional ``adapter_ln[a]`` LayerNorm(d).
    """

    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_ln")
    stackable = True
    other_param_names = ("adapter_scaling", "adapter_act", "adapter_dropout")
    mergeable = False
    merge_hint = (" A bottleneck adapter applies a non-linearity, U·f(D·h), which no change of the base weights can "
                  "express; keep the adapter layers, or remove them with unload().")

    def __init__(self, base_layer: nn.Module, placement: str, hidden: int) -> None:
        super().__init__(base_layer)
        self.placement = placement
        self.hidden_size = hidden
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_ln = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.adapter_scaling: dict[str, float] = {}
        self.adapter_act: dict[str, str] = {}

    def update_layer(self, adapter_name: str, config: BottleneckConfig, key: str) -> None:
        if config.placement != self.placement:
            raise TargetError(f"{key} holds bottleneck adapters placed {self.placement!r}; adapter {adapter_name!r} "
                              f"would be placed {config.placement!r} on the same module.")
        d = self.hidden_size
        m = config.bottleneck_size or d // config.reduction_factor
        if m < 1:
            raise ConfigError(
                f"BottleneckConfig.reduction_factor={config.reduction_factor} is larger than the hidden size {d} of "
                f"{key}, leaving no bottleneck; use reduction_factor <= {d} or set bottleneck_size."
            )
        device = self._adapter_device()
        check_new_tensors(f"{key}: a bottleneck of size {m}", [(m, d), (d, m)], device,
                          "Use a smaller bottleneck_size (or a larger reduction_factor)")
        down = nn.Linear(d, m, device=device)
        up = nn.Linear(m, d, device=device)
        nn.init.zeros_(down.bias)
        if config.init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        if config.use_layer_norm:
            self.adapter_ln[adapter_name] = nn.LayerNorm(d, device=device)
        self.adapter_dropout[adapter_name] = nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        self.adapter_scaling[adapter_name] = config.scale
        self.adapter_act[adapter_name] = config.non_linearity

    # -- the adapter ----------------------------------------------------------------------------
    def _one(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if name in self.adapter_ln:
            h = self.adapter_ln[name](h)
        z = self.adapter_dropout[name](ACTIVATIONS[self.adapter_act[name]](self.adapter_down[name](h)))
        return self.adapter_up[name](z) * self.adapter_scaling[name]

    def _delta(self, h: torch.Tensor, names: list[str], mixed: Optional[MixedBatch]) -> Optional[torch.Tensor]:
        """Σ_a A_a(h) over the active adapters, or each row's own adapter in a mixed batch (None: nothing)."""
        if not isinstance(h, torch.Tensor):
            raise PeftkitError(f"A bottleneck adapter needs a tensor at {type(self.get_base_layer()).__name__}, got "
                               f"{type(h).__name__}; place it on a module whose output is a tensor.")
        if mixed is not None:
            return self._mixed_delta(h, mixed)
        if not names:
            return None
        hd = h.to(self.adapter_down[names[0]].weight.dtype)
        out = self._one(names[0], hd)
        for n in names[1:]:
            out = out + self._one(n, hd)
        return out.to(h.dtype)

    def _mixed_delta(self, h: torch.Tensor, mixed: MixedBatch) -> Optional[torch.Tensor]:
        names = tuple(self.adapter_down.keys())
        if not names:
            return None
        acts = {self.adapter_act[n] for n in names}
        if len(acts) > 1:
            raise PeftkitError(f"Mixed-adapter batches need one non_linearity for all bottleneck adapters of a module; "
                               f"this one has {sorted(acts)}.")
        d = self.hidden_size
        batch = h.shape[0]
        idx = mixed.index(names, h.device, batch)
        first = self.adapter_down[names[0]].weight
        dtype, device = first.dtype, first.device
        sizes = [self.adapter_down[n].out_features for n in names]
        m = max(sizes)
        pad = [m - s for s in sizes]
        down_w = torch.stack([first.new_zeros(d, m)] + [F.pad(self.adapter_down[n].weight.T, (0, p))
                                                      for n, p in zip(names, pad)])            # (n+1, d, m)
        down_b = torch.stack([first.new_zeros(m)] + [F.pad(self.adapter_down[n].bias, (0, p)) for n, p in zip(names, pad)])
        up_w = torch.stack([first.new_zeros(m, d)] + [F.pad(self.adapter_up[n].weight.T * self.adapter_scaling[n],
                                                            (0, 0, 0, p)) for n, p in zip(names, pad)])  # (n+1, m, d)
        up_b = torch.stack([first.new_zeros(d)] + [self.adapter_up[n].bias * self.adapter_scaling[n] for n in names])
        x = h.reshape(batch, -1, d).to(dtype)
        if len(self.adapter_ln):
            lns = [self.adapter_ln[n] if n in self.adapter_ln else None for n in names]
            eps = {ln.eps for ln in lns if ln is not None}
            if len(eps) > 1:
                raise PeftkitError("Mixed-adapter batches need one LayerNorm eps for all bottleneck adapters of a module.")
            ones, zeros = torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype)
            gamma = torch.stack([ones] + [ln.weight if ln is not None else ones for ln in lns]).index_select(0, idx)
            beta = torch.stack([zeros] + [ln.bias if ln is not None else zeros for ln in lns]).index_select(0, idx)
            has = torch.tensor([False] + [ln is not None for ln in lns], device=h.device).index_select(0, idx)
            normed = F.layer_norm(x, (d,), eps=eps.pop()) * gamma.unsqueeze(1) + beta.unsqueeze(1)
            x = torch.where(has.view(batch, 1, 1), normed, x)
        z = torch.baddbmm(down_b.index_select(0, idx).unsqueeze(1), x, down_w.index_select(0, idx))
        z = ACTIVATIONS[acts.pop()](z)
        if self.training:
            z = rowwise_dropout(z, [0.0] + [dropout_p(self.adapter_dropout[n]) for n in names], idx)
        out = torch.baddbmm(up_b.index_select(0, idx).unsqueeze(1), z, up_w.index_select(0, idx))
        return out.reshape(h.shape).to(h.dtype)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        mixed = current_mixed_batch()
        names = [n for n in self.active_adapters if n in self.adapter_down]
        if mixed is None and not names:
            return self.base_layer(x, *args, **kwargs)
        if self.placement == "output":
            h = self.base_layer(x, *args, **kwargs)
            delta = self._delta(h, names, mixed)
            return h if delta is None else h + delta
        if self.placement == "input":
            delta = self._delta(x, names, mixed)
            y = self.base_layer(x, *args, **kwargs)
            return y if delta is None else y + delta
        # "residual": the block is called as M(h, r) and adds r itself
        if not args:
            raise PeftkitError(f"parallel_input='residual' needs {type(self.get_base_layer()).__name__} to be called "
                               "with the residual as its second positional argument; use parallel_input='input'.")
        r = args[0]
        delta = self._delta(r, names, mixed)
        if delta is not None:
            r = r + delta
        return self.base_layer(x, r, *args[1:], **kwargs)

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, hidden={self.hidden_size}, " + super().extra_repr()


def make_layer(target: nn.Module, config: BottleneckConfig, adapter_name: str, key: str) -> BottleneckLayer:
    placement = config.placement
    layer = BottleneckLayer(target, placement, hidden_size(target, placement, key))
    layer.update_layer(adapter_name, config, key)
    return layer


__all__ = ["ACTIVATIONS", "BottleneckLayer", "make_layer"]
