"""BitFit (Ben Zaken et al. 2022): train only bias terms.

:class:`BitFitLayer` wraps a module with a bias ``b0`` and holds one bias ``b_a`` per adapter
(``bitfit_bias[a]``, initialised to ``b0``: a no-op start)::

    y = f(x; W, b_eff),     b_eff = b0 + Σ_{a active} (b_a − b0)      (one active adapter: b_eff = b_a)

computed exactly by calling the base module with ``b_eff`` in place of its bias
(``torch.func.functional_call``), so any module with a ``bias`` parameter works. A mixed batch adds
the gathered per-row ``b_a − b0`` along the module's channel axis to the base output. Merging writes
``b_eff`` into the base bias (the original is kept for an exact unmerge). Targets: every module with a
bias parameter, or those matching ``target_modules``. File keys are the model's own bias keys
(``base_model.model.<module>.bias``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ...core.layer import AdapterLayer
from ...core.mixed import MixedBatch
from ...errors import MergeError, PeftkitError, TargetError
from .config import BitFitConfig


# channel axis of the bias in the output of common module types (for mixed batches)
def _bias_axis(module: nn.Module) -> Optional[int]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D, nn.LayerNorm, nn.Bilinear)):
        return -1
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1
    return None


class BitFitLayer(AdapterLayer):
    """BitFit on a module with a bias ``b0``: ``y = f(x; W, b_eff)``, ``b_eff = b0 + Σ_active (b_a − b0)``.

    ``bitfit_bias[a]`` has the shape of ``b0`` (e.g. (out,) for a linear map, (C,) for a conv or a norm).
    """

    adapter_layer_names = ("bitfit_bias",)
    save_key_renames = {"bitfit_bias": "bias"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self._original_bias: Optional[torch.Tensor] = None  # the base bias while adapters are merged

    def update_layer(self, adapter_name: str, config: BitFitConfig, key: str) -> None:
        bias = self.get_base_layer()._parameters.get("bias")
        if not isinstance(bias, nn.Parameter):
            raise TargetError(f"{key} ({type(self.get_base_layer()).__name__}) has no bias to train.")
        source = self._original_bias if self._original_bias is not None else bias
        self.bitfit_bias[adapter_name] = nn.Parameter(source.detach().clone())

    def _reference(self) -> torch.Tensor:
        """The base bias without any merged adapter."""
        return self._original_bias if self._original_bias is not None else self.get_base_layer().bias

    def effective_bias(self, names: list[str]) -> torch.Tensor:
        base_bias = self.get_base_layer().bias
        if len(names) == 1 and not self.merged:
            return self.bitfit_bias[names[0]].to(base_bias.dtype)
        ref = self._reference().float()
        out = base_bias.float()
        for n in names:
            out = out + (self.bitfit_bias[n].float() - ref)
        return out.to(base_bias.dtype)

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> Any:
        names = [n for n in self.active_adapters if n in self.bitfit_bias and n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        bias = self.effective_bias(names)
        return torch.func.functional_call(self.base_layer, {"bias": bias}, (x, *args), kwargs)

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: MixedBatch) -> torch.Tensor:
        """base(x) plus each row's gathered ``b_a − b0`` along the channel axis (slot 0: zeros)."""
        names = tuple(self.bitfit_bias.keys())
        result = self.base_layer(x, *args, **kwargs)
        if not names:
            return result
        base = self.get_base_layer()
        axis = _bias_axis(base)
        if axis is None:
            raise PeftkitError(
                f"Mixed-adapter batches for BitFit are supported on linear, conv and norm layers, not on "
                f"{type(base).__name__}."
            )
        ref = base.bias.float()
        deltas = torch.stack([torch.zeros_like(ref)] + [self.bitfit_bias[n].float() - ref for n in names])
        rows = deltas.index_select(0, mixed.index(names, result.device, result.shape[0]))  # (batch, *bias.shape)
        if axis == -1:
            rows = rows.view(rows.shape[0], *([1] * (result.dim() - rows.dim())), *rows.shape[1:])
        else:
            rows = rows.view(rows.shape[0], rows.shape[1], *([1] * (result.dim() - 2)))
        return (result.float() + rows).to(result.dtype) if result.dtype != rows.dtype else result + rows

    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """As :meth:`AdapterLayer.check_merge`; with ``safe_merge`` the merged biases are computed and checked."""
        super().check_merge(adapter_names)
        if not safe_merge:
            return
        base = self.get_base_layer()
        original = (self._original_bias if self._original_bias is not None else base.bias).detach().float()
        current = base.bias.detach().float()
        for name in self.adapters_to_merge(adapter_names):
            current = current + (self.bitfit_bias[name].detach().float() - original)
            if not torch.isfinite(current.to(base.bias.dtype)).all():
                raise MergeError(f"Merging adapter {name!r} gives NaN/inf biases; the adapter is broken. "
                                 "Nothing was merged.")

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        if self._original_bias is None:
            new = self.bitfit_bias[name].detach().float()
        else:
            new = base.bias.float() + (self.bitfit_bias[name].detach().float() - self._original_bias.float())
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"Merging adapter {name!r} gives NaN/inf biases; the adapter is broken. Nothing was merged.")
        with torch.no_grad():
            if self._original_bias is None:
                self._original_bias = base.bias.detach().clone()
            base.bias.copy_(new.to(base.bias.dtype))

    def _unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            if not self.merged_adapters:  # the last merged adapter: restore the original exactly
                base.bias.copy_(self._original_bias)
                self._original_bias = None
            else:
                delta = self.bitfit_bias[name].detach().float() - self._original_bias.float()
                base.bias.copy_((base.bias.float() - delta).to(base.bias.dtype))


def make_bitfit_layer(target: nn.Module, config: BitFitConfig, adapter_name: str, key: str) -> BitFitLayer:
    layer = BitFitLayer(target)
    layer.update_layer(adapter_name, config, key)
    return layer


__all__ = ["BitFitLayer", "make_bitfit_layer"]
