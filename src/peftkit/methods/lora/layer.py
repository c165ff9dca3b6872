"""The bookkeeping every LoRA layer shares: ranks, scalings, dropouts, init, merging, the forward states.

For a frozen weight ``W`` (out x in) LoRA learns ``A`` (r x in) and ``B`` (out x r)::

    y = W x + b + s · B A dropout(x),      s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

computed as two thin matmuls, never by forming ``B A``. ``B`` starts at zero, so the adapter starts
as a no-op. A DoRA adapter also has a variant object (:mod:`.dora`) that rescales the result. The
layer types (:mod:`.linear`, :mod:`.embedding`, :mod:`.conv`) create the tensors, compute the delta
and add an adapter's contribution; this base class does the rest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from ...core.base_call import call_base
from ...core.layer import AdapterLayer, check_merged_finite
from ...core.memory import check_new_tensors
from ...core.mixed import MixedBatch, current_mixed_batch
from ...errors import ConfigError, MergeError, PeftkitError, PeftkitWarning, TargetError
from ...quant import dequantize_weight, is_quantized_module, requantize_weight_
from .dora import DoraVariant

if TYPE_CHECKING:
    from .config import LoraConfig


def store_base_weight(base: nn.Module, new: torch.Tensor) -> None:
    """Write ``new`` (float, in the layout of the base weight) into the base layer: requantized if the
    base is quantized (peftkit.quant records the error), else copied into its weight in place."""
    if is_quantized_module(base):
        requantize_weight_(base, new)
    else:
        base.weight.copy_(new.to(base.weight.dtype))


class LoraLayer(AdapterLayer):
    """Shared bookkeeping of every LoRA layer (ranks, scalings, dropouts, init, merging).

    Per adapter ``name``: ``r[name]``, ``lora_alpha[name]``, ``scaling[name]`` (s), ``lora_dropout[name]``,
    ``use_dora[name]`` / ``dora[name]`` (the DoRA variant object), ``lora_bias[name]`` (B has a bias),
    and the tensors in ``lora_A`` / ``lora_B`` (linear, conv) or ``lora_embedding_A`` /
    ``lora_embedding_B`` (embeddings) and ``lora_magnitude_vector`` (DoRA).
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    stackable = True
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "dora", "lora_bias")
    save_key_renames = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}
    dora_variant: Optional[type[DoraVariant]] = None  # DoRA on this layer type (None: not supported)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.dora: dict[str, DoraVariant] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.fan_in_fan_out = fan_in_fan_out
        self._stack_cache: Optional[tuple] = None  # Linear's stacked adapters for mixed batches
        self._road: Optional[Any] = None  # Linear's no-grad plan (fast_path.RoadPlan)

    # -- creation -----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: "LoraConfig", key: str) -> None:
        r, alpha = config.rank_for(key), config.alpha_for(key)
        if r <= 0:
            raise ConfigError(f"{key}: rank must be > 0, got {r}.")
        if config.use_dora and self.dora_variant is None:
            raise TargetError(f"{key}: DoRA is not supported on {type(self.get_base_layer()).__name__} layers in peftkit.")
        kernel = math.prod(getattr(self.get_base_layer(), "kernel_size", None) or (1,))
        check_new_tensors(f"{key}: LoRA r={r}", [(r, self.in_features * kernel), (self.out_features, r)],
                          self._adapter_device(), "Use a smaller r (or rank_pattern)")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.use_dora[adapter_name] = config.use_dora
        self.lora_bias[adapter_name] = config.lora_bias
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                          "has no bias. This means that merging LoRA weights won't be possible.", PeftkitWarning,
                          stacklevel=2)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._create(adapter_name, r, config)
        try:
            self._init_weights(adapter_name, config.init_lora_weights)
        except PeftkitError as exc:
            raise type(exc)(f"{key}: {exc}") from None
        if config.use_dora:
            self.dora[adapter_name] = self.dora_variant.create(self, adapter_name)
        else:
            self.dora.pop(adapter_name, None)
        self.clear_cache()

    def _create(self, name: str, r: int, config: "LoraConfig") -> None:
        raise NotImplementedError

    def _init_weights(self, name: str, init: Union[bool, str]) -> None:
        if init is False:
            return
        if isinstance(init, str) and init.startswith("pissa"):
            self._init_pissa(name, init)
            return
        if name in self.lora_A:
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            if self.lora_B[name].bias is not None:
                nn.init.zeros_(self.lora_B[name].bias)
        else:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def _init_pissa(self, name: str, init: str) -> None:
        raise TargetError(f"init_lora_weights={init!r} (PiSSA) is only supported on linear layers.")

    def clear_cache(self) -> None:
        self._stack_cache = None
        self._road = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "LoraLayer":
        # ``.to()`` / ``.half()`` may give the parameters new storage: drop views of the old one
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    # -- deltas and merging -------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` in the layout of the base weight, fp32."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "lora." + super().__repr__()  # ``lora.Linear(...)``, as Hugging Face PEFT prints its layers

    def merged_contribution(self) -> torch.Tensor | float:
        """What the merges of this layer's merged adapters added to the base weight (float): ``s B A``
        for LoRA, the remembered change for DoRA; 0 when none is merged."""
        total: torch.Tensor | float = 0.0
        for name in self.merged_adapters:
            variant = self.dora.get(name)
            added = variant.merged_delta if variant is not None else None
            total = total + (added if added is not None else self.delta_weight(name))
        return total

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Hugging Face PEFT's name: :meth:`delta_weight` in the base weight's (floating) dtype."""
        delta = self.delta_weight(adapter)
        dtype = getattr(self.get_base_layer(), "weight", delta).dtype
        return delta.to(dtype) if dtype.is_floating_point else delta

    def _merged_weight(self, name: str, weight: torch.Tensor, remember: bool = True) -> torch.Tensor:
        """``weight`` (the base weight, float) with adapter ``name`` merged in: ``W + s B A``, DoRA-rescaled."""
        new = weight + self.delta_weight(name)
        variant = self.dora.get(name)
        if variant is not None:
            new = variant.merged_weight(self, name, weight, new, remember=remember)
        return new

    def _merged_bias(self, name: str, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The base bias (float) after merging ``name``'s ``lora_B`` bias, or None if it has none."""
        if not self.lora_bias.get(name) or bias is None:
            return None
        return bias + self.lora_B[name].bias.float() * self.scaling[name]

    def _check_finite(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """safe_merge: MergeError if the merged values are not finite as stored (in the base dtype)."""
        base = self.get_base_layer()
        check_merged_finite(name, weight, bias, None if is_quantized_module(base) else base.weight.dtype,
                            base.bias.dtype if bias is not None else None)

    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """As :meth:`AdapterLayer.check_merge`; with ``safe_merge`` the merged weights are computed
        (adapter after adapter, as :meth:`merge` does) and checked, then dropped."""
        super().check_merge(adapter_names)
        names = self.adapters_to_merge(adapter_names)
        base = self.get_base_layer()
        if names and is_quantized_module(base) and not getattr(base, "is_quantized_linear", False):
            requantize_weight_(base, None)  # raises: bitsandbytes weights cannot be requantized
        biased = [n for n in names if self.lora_bias.get(n) and getattr(base, "bias", None) is None]
        if biased:
            raise MergeError(f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: "
                             f"adapter {biased[0]!r} has lora_bias=True but the base {type(base).__name__} has no bias "
                             "to merge it into; keep the adapter unmerged. Nothing was merged.")
        if not safe_merge or not names:
            return
        with torch.no_grad():
            weight = dequantize_weight(base).float()
            bias = base.bias.float() if getattr(base, "bias", None) is not None else None
            for name in names:
                weight = self._merged_weight(name, weight, remember=False)
                merged_bias = self._merged_bias(name, bias)
                bias = merged_bias if merged_bias is not None else bias
                self._check_finite(name, weight, merged_bias)

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            new = self._merged_weight(name, dequantize_weight(base).float())
            if safe_merge:
                self._check_finite(name, new, self._merged_bias(name, getattr(base, "bias", None)))
            store_base_weight(base, new)
            if self.lora_bias.get(name) and base.bias is not None:
                base.bias.add_((self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype))
        self.clear_cache()

    def _unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        current = dequantize_weight(base).float()
        variant = self.dora.get(name)
        if variant is not None:
            current = variant.unmerged_weight(self, name, current)
        with torch.no_grad():
            store_base_weight(base, current - self.delta_weight(name))  # a quantized base: inexact (requantized)
            if self.lora_bias.get(name) and base.bias is not None:
                base.bias.sub_((self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype))
        self.clear_cache()

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Disabled: base only (merged adapters are unmerged first). Merged: the base already holds
        them. Mixed batch: each row its own adapter. Otherwise base + each active adapter.

        The states of :meth:`AdapterLayer.forward`, written out here rather than through its
        ``_active_forward`` / ``_mixed_forward`` hooks: LoRA computes the base output the same way in
        both, and this is the hottest Python of an unmerged model (one call level less per layer;
        state read from ``__dict__``, as ``nn.Module`` attribute reads are several times slower)."""
        d = self.__dict__
        base = d["_modules"]["base_layer"]
        if d["disabled"]:
            if d["merged_adapters"]:
                self.unmerge()
            return call_base(base, x, args, kwargs)[0]
        result, fresh = call_base(base, x, args, kwargs)
        mixed = current_mixed_batch()
        if mixed is not None:
            self._check_mixed()
            return self._mixed_lora(x, result, mixed, fresh)
        merged, ranks = d["merged_adapters"], d["r"]
        for name in d["active_adapters"]:
            if name in ranks and name not in merged:
                result = self._add_adapter(name, x, result)
        return result

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus adapter ``name``'s contribution for input ``x`` (out of place: ``result``
        may be an output a hook has seen)."""
        raise NotImplementedError

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        """``result`` (the base output) plus each row's adapter. ``fresh``: ``result`` was made by this
        layer and nobody else holds it (not returned through a hook), so it may be added into in
        place when no gradient is recorded."""
        raise NotImplementedError


__all__ = ["LoraLayer", "store_base_weight"]
