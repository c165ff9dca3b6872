"""LoRA on ``torch.nn.MultiheadAttention``: the packed q/k/v projection and the output projection.

``nn.MultiheadAttention`` holds its q/k/v projection as one parameter ``in_proj_weight`` (3E x E)
and never calls ``out_proj.forward`` (it reads ``out_proj.weight`` / ``.bias``), so LoRA adapts the
weights the attention is computed with rather than wrapping linear calls::

    W_in'  = W_in  + s · B A            A (r, E), B (3E, r)    (b_in' = b_in + s · b_B with lora_bias)
    W_out' = W_out + s · B_o A_o        A_o (r, E), B_o (E, r)
    y, attn = MultiheadAttention(query, key, value, ...; W_in', b_in', W_out', b_out)

``A`` / ``B`` live in this layer; ``A_o`` / ``B_o`` in a LoRA :class:`~.linear.Linear` that replaces
the base's ``out_proj``, so the keys are Hugging Face PEFT's: ``mha.lora_A.weight``,
``mha.lora_B.weight``, ``mha.base_layer.out_proj.lora_A.weight``, ``mha.base_layer.out_proj.lora_B.weight``.
Both get the rank and alpha of the targeted module's key. The forward runs the base module with the
adapted weights swapped in (``torch.func.functional_call``: differentiable, the base parameters are
never touched), so gradients reach A and B. ``lora_dropout`` is not applied (the weights are adapted,
not an input; as in Hugging Face PEFT). Not supported, with a clear error: separate q/k/v weights
(``kdim``/``vdim`` != ``embed_dim``), DoRA, PiSSA init, mixed-adapter batches (``adapter_names=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from ...core.layer import AdapterLayer, check_merged_finite
from ...core.mixed import current_mixed_batch
from ...errors import ConfigError, MergeError, PeftkitError, TargetError
from .config import LoraConfig
from .layer import LoraLayer
from .linear import Linear


class MixedBatchUnsupportedError(PeftkitError, TypeError):
    """A mixed-adapter batch (``adapter_names=``) reached a layer that cannot route rows to adapters."""


def _base_attribute(name: str, doc: str) -> property:
    """A read-only property reading attribute ``name`` of the wrapped ``nn.MultiheadAttention``
    (code around an attention module, such as ``nn.TransformerEncoderLayer``, reads them)."""
    return property(lambda self: getattr(self.get_base_layer(), name), doc=doc)


def keep_off_fused_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing when called. Its presence matters: in eval mode
    ``nn.TransformerEncoderLayer`` runs a fused kernel on ``self_attn.in_proj_weight`` /
    ``out_proj.weight`` (the base weights) without calling ``self_attn``, which would silently drop
    the adapters; torch skips that path when a submodule has forward hooks."""
    return None


class MultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention`` (see the module doc for the math and the keys).

    ``base_layer`` is the attention module, its ``out_proj`` replaced by a LoRA
    :class:`~.linear.Linear` that this layer creates, updates and deletes adapters in. The engine
    sees that inner layer too: it is activated, merged, unmerged, saved and unloaded as any LoRA
    linear layer, while this layer merges the in-projection. The forward adds, for each part, the
    active adapters not merged into it, so any merge state computes ``y`` above.
    """

    dora_variant = None  # DoRA is not supported here (nor in Hugging Face PEFT)

    embed_dim = _base_attribute("embed_dim", "E, the model dimension.")
    kdim = _base_attribute("kdim", "Key dimension (equal to embed_dim here).")
    vdim = _base_attribute("vdim", "Value dimension (equal to embed_dim here).")
    _qkv_same_embed_dim = _base_attribute("_qkv_same_embed_dim", "Packed q/k/v weights (always True here).")
    num_heads = _base_attribute("num_heads", "Number of heads.")
    head_dim = _base_attribute("head_dim", "E // num_heads.")
    dropout = _base_attribute("dropout", "Attention dropout probability of the base module.")
    batch_first = _base_attribute("batch_first", "Inputs are (batch, seq, E) rather than (seq, batch, E).")
    in_proj_weight = _base_attribute("in_proj_weight", "The base (unadapted) packed q/k/v weight, (3E, E).")
    in_proj_bias = _base_attribute("in_proj_bias", "The base packed q/k/v bias, (3E,), or None.")
    out_proj = _base_attribute("out_proj", "The output projection (the LoRA Linear wrapping it).")
    bias_k = _base_attribute("bias_k", "add_bias_kv key bias, or None.")
    bias_v = _base_attribute("bias_v", "add_bias_kv value bias, or None.")
    add_zero_attn = _base_attribute("add_zero_attn", "Whether a zero batch is appended to keys/values.")

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise TargetError("LoRA on nn.MultiheadAttention needs packed q/k/v weights (kdim == vdim == embed_dim); "
                              "this module has separate q_proj_weight/k_proj_weight/v_proj_weight.")
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TargetError(f"LoRA on nn.MultiheadAttention needs an nn.Linear out_proj, got "
                              f"{type(base_layer.out_proj).__name__}.")
        super().__init__(base_layer)
        self.in_features = base_layer.embed_dim
        self.out_features = 3 * base_layer.embed_dim
        base_layer.out_proj = Linear(base_layer.out_proj)
        self.register_forward_pre_hook(keep_off_fused_path)

    def merge_masks(self, *args: Any, **kwargs: Any) -> tuple[Optional[torch.Tensor], Optional[int]]:
        """The base module's ``merge_masks`` (``nn.TransformerEncoderLayer`` calls it)."""
        return self.get_base_layer().merge_masks(*args, **kwargs)

    def _out_layer(self) -> Optional[Linear]:
        """The LoRA layer on the base's ``out_proj`` (None once the engine unwrapped it)."""
        out = self.get_base_layer().out_proj
        return out if isinstance(out, Linear) else None

    # -- creation -----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        """Adapter ``adapter_name`` on the in-projection (here) and on ``out_proj`` (same rank and alpha)."""
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith("pissa"):
            raise TargetError(f"{key}: init_lora_weights={config.init_lora_weights!r} (PiSSA) is not supported on "
                              "nn.MultiheadAttention; use True, False or 'gaussian'.")
        if config.lora_bias and self.get_base_layer().in_proj_bias is None:
            raise ConfigError(f"{key}: lora_bias=True needs a base with biases; this nn.MultiheadAttention was built "
                              "with bias=False.")
        super().update_layer(adapter_name, config, key)
        out = self._out_layer()
        if out is not None:
            out.update_layer(adapter_name, config, key)

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        device = self._adapter_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into {type(self).__name__}; unmerge it before deleting.")
        super().delete_adapter(name)
        out = self._out_layer()
        if out is not None:
            out.delete_adapter(name)

    # -- deltas and merging -------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` (3E x E), fp32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Hugging Face PEFT's name: :meth:`delta_weight` in the dtype of the base ``in_proj_weight``."""
        return self.delta_weight(adapter).to(self.get_base_layer().in_proj_weight.dtype)

    def _bias_delta(self, name: str) -> Optional[torch.Tensor]:
        """``s · b_B`` (3E,) fp32 with ``lora_bias``, else None."""
        bias = self.lora_B[name].bias
        return None if bias is None else bias.float() * self.scaling[name]

    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """As :meth:`AdapterLayer.check_merge`; with ``safe_merge`` the merged in-projection weights are
        computed (adapter after adapter) and checked in the base dtype, then dropped."""
        AdapterLayer.check_merge(self, adapter_names)
        if not safe_merge:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            weight, bias = base.in_proj_weight.float(), base.in_proj_bias
            bias = None if bias is None else bias.float()
            for name in self.adapters_to_merge(adapter_names):
                weight = weight + self.delta_weight(name)
                extra = self._bias_delta(name)
                bias = bias if extra is None or bias is None else bias + extra
                self._check_in_proj(name, weight, bias)

    def _check_in_proj(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        check_merged_finite(name, weight, bias, self.get_base_layer().in_proj_weight.dtype)

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        self._shift_in_proj(name, +1.0, check=safe_merge)

    def _unmerge_one(self, name: str) -> None:
        self._shift_in_proj(name, -1.0, check=False)

    def _shift_in_proj(self, name: str, sign: float, check: bool) -> None:
        """Add (``sign`` +1) or subtract (-1) adapter ``name``'s delta to the base in-projection, in place."""
        base = self.get_base_layer()
        with torch.no_grad():
            weight = base.in_proj_weight.float() + sign * self.delta_weight(name)
            extra = self._bias_delta(name)
            bias = None if extra is None else base.in_proj_bias.float() + sign * extra
            if check:
                self._check_in_proj(name, weight, bias)
            base.in_proj_weight.copy_(weight.to(base.in_proj_weight.dtype))
            if bias is not None:
                base.in_proj_bias.copy_(bias.to(base.in_proj_bias.dtype))
        self.clear_cache()

    # -- running ------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base attention with the active, unmerged adapters added to its weights (module doc).
        Disabled: the base module as it is (merged adapters are unmerged first). The outputs are cast to
        ``query``'s dtype, as Hugging Face PEFT does."""
        if current_mixed_batch() is not None:
            raise MixedBatchUnsupportedError(
                "lora.MultiheadAttention does not support mixed adapter batches (adapter_names=): its adapters "
                "change the attention weights, which all rows share. Run one adapter per batch (set_adapter).")
        base = self.get_base_layer()
        out = self._out_layer()
        if self.disabled:
            for layer in (self, out):
                if layer is not None and layer.merged:
                    layer.unmerge()
            return self._cast(base(query, *args, **kwargs), query.dtype)
        swapped = self._adapted_in_proj(base)
        if out is not None:
            swapped.update(_adapted_out_proj(out))
        if not swapped:
            return self._cast(base(query, *args, **kwargs), query.dtype)
        result = torch.func.functional_call(base, swapped, (query, *args), kwargs, strict=False)
        return self._cast(result, query.dtype)

    def _adapted_in_proj(self, base: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
        """``{"in_proj_weight": W_in', "in_proj_bias": b_in'}`` for the active adapters not merged here
        (empty if none), differentiable in A and B."""
        names = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if not names:
            return {}
        weight, bias = base.in_proj_weight, base.in_proj_bias
        for name in names:
            A, B = self.lora_A[name], self.lora_B[name]
            weight = weight + ((B.weight @ A.weight) * self.scaling[name]).to(weight.dtype)
            if B.bias is not None:
                bias = bias + (B.bias * self.scaling[name]).to(bias.dtype)
        swapped = {"in_proj_weight": weight}
        if bias is not base.in_proj_bias:
            swapped["in_proj_bias"] = bias
        return swapped

    @staticmethod
    def _cast(result: Any, dtype: torch.dtype) -> Any:
        output, weights = result
        return output.to(dtype), (weights.to(dtype) if weights is not None else None)


def _adapted_out_proj(out: Linear) -> dict[str, torch.Tensor]:
    """``{"out_proj.base_layer.weight": W_out', ...}`` (keys relative to the attention module) for the
    active adapters of the out_proj layer not merged into it; empty if none."""
    names = [n for n in out.active_adapters if n in out.r and n not in out.merged_adapters]
    if not names:
        return {}
    linear = out.get_base_layer()
    weight, bias = linear.weight, linear.bias
    for name in names:
        A, B = out.lora_A[name], out.lora_B[name]
        weight = weight + ((B.weight @ A.weight) * out.scaling[name]).to(weight.dtype)
        if B.bias is not None and bias is not None:
            bias = bias + (B.bias * out.scaling[name]).to(bias.dtype)
    swapped = {"out_proj.base_layer.weight": weight}
    if bias is not linear.bias:
        swapped["out_proj.base_layer.bias"] = bias
    return swapped


def make_mha_layer(target: nn.MultiheadAttention, config: LoraConfig, adapter_name: str, key: str) -> MultiheadAttention:
    """The LoRA layer for ``target`` holding adapter ``adapter_name``. On error ``target`` is left as it
    was (its ``out_proj`` put back)."""
    out_proj = target.out_proj
    try:
        layer = MultiheadAttention(target)
        layer.update_layer(adapter_name, config, key)
    except Exception:
        target.out_proj = out_proj
        raise
    return layer


__all__ = ["MixedBatchUnsupportedError", "MultiheadAttention", "keep_off_fused_path", "make_mha_layer"]
