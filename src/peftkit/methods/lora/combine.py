"""Combining LoRA adapters into a new one (``PeftModel.add_weighted_adapter``, LoRA's ``combine``).

* "cat": A = [√|w_i s_i| sign(w_i) A_i], B = [√|w_i s_i| B_i] (rank Σ r_i): exactly Σ w_i ΔW_i.
* "linear": A = Σ √|w_i s_i| sign(w_i) A_i, B = Σ √|w_i s_i| B_i (all ranks equal): the Hugging Face
  "linear" combination, which is not exactly Σ w_i ΔW_i (cross terms).
* "svd": the best rank-``svd_rank`` approximation of Σ w_i ΔW_i (optionally clamped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ...core.inject import adapter_layers
from ...errors import PeftkitError
from .embedding import Embedding
from .layer import LoraLayer

COMBINATION_TYPES = ("linear", "cat", "svd")


def add_weighted_adapter(peft_model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None) -> None:
    """A new LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (see the module doc).

    "cat" is exact (rank = sum of ranks); "svd" is the best approximation of Σ wᵢ·ΔWᵢ at rank
    ``svd_rank`` (default: the largest rank); "linear" sums the scaled A and B factors (equal ranks
    only, as Hugging Face PEFT; not exactly Σ wᵢ·ΔWᵢ). ``PeftModel.add_weighted_adapter`` has checked
    the names and that every adapter is LoRA."""
    if combination_type not in COMBINATION_TYPES:
        raise PeftkitError(f"combination_type {combination_type!r} is not supported; use 'linear', 'cat' or 'svd'.")
    configs = [peft_model.peft_config[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise PeftkitError("add_weighted_adapter does not combine DoRA adapters (their magnitudes do not add).")
    with_params = [a for a, c in zip(adapters, configs) if c.target_parameters]
    if with_params:
        raise PeftkitError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter "
                           f"{with_params[0]!r}: it has target_parameters).")
    shared = [m for m in {m for c in configs for m in (c.modules_to_save or [])}
              if sum(m in (c.modules_to_save or []) for c in configs) > 1]
    if shared:
        raise PeftkitError(f"Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                           f"{len(shared)} such instance(s). (add_weighted_adapter cannot combine trained copies of "
                           f"{sorted(shared)}.)")
    if any(c.modules_to_save for c in configs):
        raise PeftkitError("add_weighted_adapter cannot combine adapters with modules_to_save.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise PeftkitError(f"svd_rank must be an integer > 0, got {svd_rank!r}.")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 < svd_clamp <= 1):
        raise PeftkitError(f"svd_clamp must be a quantile in (0, 1] (e.g. 0.99) or None, got {svd_clamp!r}.")
    ranks = _target_ranks(peft_model.get_base_model(), adapters, combination_type, svd_rank)
    r = max(ranks.values())
    pattern = {k: v for k, v in ranks.items() if v != r}
    new_config = configs[0].replace(
        r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
        layers_to_transform=None, layers_pattern=None, exclude_modules=None, use_rslora=False,
        init_lora_weights=False, lora_bias=False,
    )
    peft_model.add_adapter(adapter_name, new_config)
    for _, layer in adapter_layers(peft_model.get_base_model()):
        if isinstance(layer, LoraLayer) and adapter_name in layer.r:
            combine_layer(layer, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp)
            layer.clear_cache()


def _target_ranks(model: nn.Module, adapters: Sequence[str], combination_type: str,
                  svd_rank: Optional[int]) -> dict[str, int]:
    """The rank of the combined adapter in each layer that holds one of ``adapters``."""
    ranks: dict[str, int] = {}
    for key, layer in adapter_layers(model):
        if not isinstance(layer, LoraLayer):
            continue
        rs = [layer.r[a] for a in adapters if a in layer.r]
        if not rs:
            continue
        if combination_type == "linear" and len(set(rs)) > 1:
            raise PeftkitError(f"'linear' needs adapters of equal rank; {key} has ranks {rs}. Use 'cat' or 'svd'.")
        ranks[key] = sum(rs) if combination_type == "cat" else (svd_rank or max(rs)) if combination_type == "svd" else rs[0]
        if combination_type == "svd" and svd_rank is not None and svd_rank > _full_rank(layer, adapters):
            raise PeftkitError(f"svd_rank={svd_rank} is larger than the rank any update of {key} can have "
                               f"({_full_rank(layer, adapters)}: the smaller side of its weight); use at most that.")
    return ranks


def _full_rank(layer: LoraLayer, adapters: Sequence[str]) -> int:
    """The largest rank of a weight update of ``layer``: the smaller side of ``B A`` (out x in·kernel)."""
    name = next(a for a in adapters if a in layer.r)
    if name in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return min(b.shape[0], a.flatten(1).shape[1])


def combine_layer(layer: LoraLayer, adapters: Sequence[str], weights: Sequence[float], new: str,
                  combination_type: str, svd_rank: Optional[int], svd_clamp: Optional[float]) -> None:
    """Fill adapter ``new`` of ``layer`` (already created with the target rank, alpha == rank so s = 1).

    * "cat": A = [√|w_i s_i| sign(w_i) A_i], B = [√|w_i s_i| B_i] (rank Σ r_i): exactly Σ w_i ΔW_i.
    * "linear": A = Σ √|w_i s_i| sign(w_i) A_i, B = Σ √|w_i s_i| B_i (all ranks equal): the
      Hugging Face "linear" combination, which is not exactly Σ w_i ΔW_i (cross terms).
    * "svd": the best rank-``svd_rank`` approximation of Σ w_i ΔW_i (optionally clamped).
    """
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    if not present:
        return
    emb = isinstance(layer, Embedding)
    get_a = (lambda n: layer.lora_embedding_A[n]) if emb else (lambda n: layer.lora_A[n].weight)
    get_b = (lambda n: layer.lora_embedding_B[n]) if emb else (lambda n: layer.lora_B[n].weight)
    target_a, target_b = get_a(new), get_b(new)
    with torch.no_grad():
        if combination_type in ("cat", "linear"):
            a_parts, b_parts = [], []
            for a, w in present:
                ws = w * layer.scaling[a]
                c = math.sqrt(abs(ws))
                a_parts.append(get_a(a).float() * c * (1 if ws >= 0 else -1))
                b_parts.append(get_b(a).float() * c)
            if combination_type == "cat":
                A, B = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
                target_a.zero_(), target_b.zero_()
                target_a[: A.shape[0]].copy_(A.reshape(target_a[: A.shape[0]].shape))
                target_b[:, : B.shape[1]].copy_(B.reshape(target_b[:, : B.shape[1]].shape))
            else:
                target_a.copy_(sum(a_parts).reshape(target_a.shape))
                target_b.copy_(sum(b_parts).reshape(target_b.shape))
            return
        if emb:
            delta = sum(w * (get_b(a).float() @ get_a(a).float()) * layer.scaling[a] for a, w in present)
        else:
            delta = sum(w * (get_b(a).float().flatten(1) @ get_a(a).float().flatten(1)) * layer.scaling[a]
                        for a, w in present)
        if not torch.isfinite(delta).all():
            raise PeftkitError(f"add_weighted_adapter: adapters {[a for a, _ in present]} hold NaN/inf values; the "
                               "weighted sum of their deltas cannot be decomposed. Fix or delete the broken adapter.")
        rank = target_a.shape[0]
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        U = U @ torch.diag(S)
        if svd_clamp is not None:
            dist = torch.cat([U.flatten(), Vh.flatten()])
            hi = torch.quantile(dist, svd_clamp)
            U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        target_a.copy_(Vh.reshape(target_a.shape))
        target_b.copy_(U.reshape(target_b.shape))


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "combine_layer"]
