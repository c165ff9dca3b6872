"""The example method's layer: a learned shift of a linear layer's output::

    y = W x + b + Σ_{a active} δ_a,        δ_a: (out,), zero at the start

Merging adds ``δ_a`` to the bias (unmerging subtracts it); a mixed batch adds each row's gathered
``δ``. File keys: ``<module>.shift``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.mixed import MixedBatch
from peftkit.errors import MergeError, TargetError

from .config import ShiftConfig


class ShiftLayer(AdapterLayer):
    adapter_layer_names = ("shift",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.shift = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: ShiftConfig, key: str) -> None:
        out = self.get_base_layer().out_features
        init = torch.zeros if config.init_zero else torch.randn
        self.shift[adapter_name] = nn.Parameter(init(out, device=self._adapter_device()))

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.shift and name not in self.merged_adapters:
                y = y + self.shift[name].to(y.dtype)
        return y

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: MixedBatch) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        names = tuple(self.shift.keys())
        stacked = torch.stack([torch.zeros_like(self.shift[names[0]])] + [self.shift[n] for n in names])
        rows = stacked.index_select(0, mixed.index(names, y.device, y.shape[0]))  # slot 0: no adapter
        return y + rows.view(rows.shape[0], *([1] * (y.dim() - 2)), -1).to(y.dtype)

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        new = self.get_base_layer().bias.detach() + self.shift[name].detach()
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"Merging adapter {name!r} gives NaN/inf biases. Nothing was merged.")
        with torch.no_grad():
            self.get_base_layer().bias.copy_(new)

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            self.get_base_layer().bias.sub_(self.shift[name].detach())


def make_layer(target: nn.Module, config: ShiftConfig, adapter_name: str, key: str) -> ShiftLayer:
    if not isinstance(target, nn.Linear) or target.bias is None:
        raise TargetError(f"{key} ({type(target).__name__}): the output shift needs an nn.Linear with a bias.")
    layer = ShiftLayer(target)
    layer.update_layer(adapter_name, config, key)
    return layer
