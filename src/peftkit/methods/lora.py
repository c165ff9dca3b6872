"""LoRA and its variants: rsLoRA scaling, DoRA, gaussian / PiSSA init.

For a frozen weight ``W`` (out x in) LoRA learns ``A`` (r x in) and ``B`` (out x r)::

    y = W x + b + s · B A dropout(x),      s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

computed as two thin matmuls, never by forming ``B A``. ``B`` starts at zero, so the adapter starts
as a no-op. DoRA (Liu et al. 2024) splits the adapted weight into magnitude and direction::

    y = m / ||W + s B A||_row · (W x + s B A x) + b

with the norm treated as a constant (detached), ``m`` initialised to ``||W||_row``.

Layers: :class:`Linear` (``nn.Linear`` and transformers ``Conv1D`` via ``fan_in_fan_out``, and
quantized linears), :class:`Embedding`, :class:`ConvNd` (``nn.Conv1d/2d/3d``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from ..config import PeftConfig, PeftType, positive_int, probability, register_config, unsupported
from ..errors import ConfigError, MergeError, PeftkitError, PeftkitWarning, TargetError
from .. import inject
from ..inject import AdapterLayer, MixedBatch, _tracing_state, call_base, current_mixed_batch, plain_linear_params
from ..quant import dequantize_weight, is_quantized_module, requantize_weight_
from . import Method, register_method

_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_autocast = torch._C._is_any_autocast_enabled

# Default target modules per model type (when target_modules is None), as Hugging Face PEFT.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
}


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """``rank_pattern`` / ``alpha_pattern`` lookup: a pattern matches a key that ends with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """Config of LoRA (field names and defaults as Hugging Face PEFT 0.21).

    Args:
        r: rank of the update (> 0).
        target_modules: module names (exact or dotted suffix), a regex (full match), or "all-linear".
        exclude_modules: modules never adapted (same forms as target_modules).
        lora_alpha: scale numerator; scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter input, in [0, 1).
        fan_in_fan_out: the base stores its weight as (in, out) (GPT-2 ``Conv1D``).
        bias: "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
        init_lora_weights: True (kaiming A, zero B), "gaussian" (A ~ N(0, 1/r)), False (random, not
            a no-op), "pissa" or "pissa_niter_<n>" (principal singular vectors; edits the base weight).
        layers_to_transform / layers_pattern: only adapt these layer indices.
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a pattern matched at the end of
            the module name.
        use_dora: weight-decomposed LoRA.
        lora_bias: give B a trainable bias.
    """

    PEFT_TYPE = PeftType.LORA

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    alpha_pattern: Optional[dict[str, int | float]] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # Fields of the Hugging Face format that peftkit carries for round trips but does not implement.
    target_parameters: Optional[list[str]] = None
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    monteclora_config: Optional[Any] = None
    arrow_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: Optional[list] = None
    trainable_token_indices: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    ensure_weight_tying: bool = False
    use_bdlora: Optional[Any] = None

    def validate(self) -> None:
        positive_int(self, "r", self.r)
        probability(self, "lora_dropout", self.lora_dropout)
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        for name, value in (self.rank_pattern or {}).items():
            positive_int(self, f"rank_pattern[{name!r}]", value)
        self.rank_pattern = self.rank_pattern or {}
        self.alpha_pattern = self.alpha_pattern or {}
        init = self.init_lora_weights
        if isinstance(init, str) and not (init in ("gaussian", "pissa") or re.fullmatch(r"pissa_niter_\d+", init)):
            raise ConfigError(
                f"LoraConfig.init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa' "
                "or 'pissa_niter_<n>'."
            )
        if self.use_dora and self.lora_bias:
            raise ConfigError("LoraConfig: use_dora=True cannot be combined with lora_bias=True.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern is only used together with layers_to_transform.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be combined with a regex target_modules; put the layers in the regex.")
        unsupported(self, "target_parameters", self.target_parameters, None, "nn.Parameter targeting")
        unsupported(self, "megatron_config", self.megatron_config, None)
        unsupported(self, "loftq_config", self.loftq_config, {}, "LoftQ init")
        for name in ("eva_config", "corda_config", "kasa_config", "lora_ga_config", "monteclora_config",
                     "arrow_config", "velora_config", "layer_replication", "trainable_token_indices",
                     "alora_invocation_tokens", "use_bdlora"):
            unsupported(self, name, getattr(self, name), None)
        unsupported(self, "use_qalora", self.use_qalora, False)
        unsupported(self, "ensure_weight_tying", self.ensure_weight_tying, False)

    def rank_for(self, key: str) -> int:
        return _pattern_value(self.rank_pattern or {}, key, self.r)

    def alpha_for(self, key: str) -> float:
        return _pattern_value(self.alpha_pattern or {}, key, self.lora_alpha)


# ---------------------------------------------------------------------------------------------


class DoraMagnitude(nn.Module):
    """The learned magnitude ``m`` of DoRA (in memory ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def _store_base_weight(base: nn.Module, new: torch.Tensor) -> None:
    """Write ``new`` (float, in the layout of the base weight) into the base layer: requantized if the
    base is quantized (peftkit.quant records the error), else copied into its weight in place."""
    if is_quantized_module(base):
        requantize_weight_(base, new)
    else:
        base.weight.copy_(new.to(base.weight.dtype))


class LoraLayer(AdapterLayer):
    """Shared bookkeeping of every LoRA layer (ranks, scalings, dropouts, init, merging)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "lora_bias")
    save_key_renames = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.fan_in_fan_out = fan_in_fan_out
        self._dora_norm: dict[str, torch.Tensor] = {}  # norms used at merge time, for exact unmerge
        self._stack_cache: Optional[tuple] = None
        self._road: Optional[tuple] = None  # Linear's no-grad plan (Linear._road_plan)

    # -- creation -----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        r, alpha = config.rank_for(key), config.alpha_for(key)
        if r <= 0:
            raise ConfigError(f"{key}: rank must be > 0, got {r}.")
        if config.use_dora and not self.supports_dora:
            raise TargetError(f"{key}: DoRA is not supported on {type(self.get_base_layer()).__name__} layers in peftkit.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.use_dora[adapter_name] = config.use_dora
        self.lora_bias[adapter_name] = config.lora_bias
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._create(adapter_name, r, config)
        self._init_weights(adapter_name, config.init_lora_weights)
        if config.use_dora:
            self._init_dora(adapter_name)
        self._clear_cache()

    supports_dora = False

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
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

    def _init_dora(self, name: str) -> None:
        with torch.no_grad():
            norm = self._dora_weight_norm(name, dequantize_weight(self.get_base_layer()).float())
        self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(torch.float32))

    def _clear_cache(self) -> None:
        self._stack_cache = None
        self._road = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "LoraLayer":
        # ``.to()`` / ``.half()`` may give the parameters new storage: drop views of the old one
        self._clear_cache()
        return super()._apply(fn, *args, **kwargs)

    # -- deltas and merging -------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` in the layout of the base weight, fp32."""
        raise NotImplementedError

    def _dora_weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        base = self.get_base_layer()
        if is_quantized_module(base) and not getattr(base, "is_quantized_linear", False):
            requantize_weight_(base, None)  # raises before anything changes: bitsandbytes weights cannot be requantized
        weight = dequantize_weight(base)
        delta = self.delta_weight(name)
        new = weight.float() + delta
        if self.use_dora.get(name):
            norm = self._dora_weight_norm(name, weight.float()).detach()
            factor = self._dora_factor_shape(self.lora_magnitude_vector[name].weight.float() / norm)
            new = new * factor
            self._dora_norm[name] = norm
        if safe_merge and not torch.isfinite(new).all():
            raise MergeError(f"Merging adapter {name!r} gives NaN/inf weights; the adapter is broken. Nothing was merged.")
        with torch.no_grad():
            _store_base_weight(base, new)
            if self.lora_bias.get(name) and base.bias is not None:
                base.bias.add_((self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype))
        self._clear_cache()

    def _unmerge_one(self, name: str) -> None:
        base = self.get_base_layer()
        current = dequantize_weight(base).float()
        if self.use_dora.get(name):
            norm = self._dora_norm.pop(name)
            factor = self._dora_factor_shape(self.lora_magnitude_vector[name].weight.float() / norm)
            current = current / factor
        with torch.no_grad():
            _store_base_weight(base, current - self.delta_weight(name))  # a quantized base: inexact (requantized)
            if self.lora_bias.get(name) and base.bias is not None:
                base.bias.sub_((self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype))
        self._clear_cache()

    def _dora_factor_shape(self, factor: torch.Tensor) -> torch.Tensor:
        """Shape ``m / norm`` (per output channel) to multiply the base weight."""
        return factor.reshape(-1, *([1] * (self.get_base_layer().weight.dim() - 1)))

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


class Linear(LoraLayer):
    """LoRA on a linear map: ``y = W x + b + s · B A dropout(x)`` (DoRA: see module doc).

    Shapes: x (..., in) -> y (..., out); A (r, in); B (out, r). With ``fan_in_fan_out`` the base
    weight is stored (in, out) (transformers ``Conv1D``); A and B keep the shapes above.
    """

    supports_dora = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        base = self.get_base_layer()
        if hasattr(base, "in_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:  # transformers Conv1D: weight (in, out)
            self.in_features, self.out_features = base.weight.shape

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """:meth:`LoraLayer.forward`. Without autograd, in the plain case, the same math in fewer
        PyTorch calls (what a decode step on a CPU pays for): the input as one 2-D matrix, ``mm`` /
        ``addmm`` on transposed views of the weights kept between calls, each adapter added into
        the base output inside its second GEMM::

            out = x Wᵀ (+ b);   out += s · (x Aᵀ) Bᵀ   (each active adapter)

        ``F.linear`` runs these same kernels, so the output is the general road's. Plain: the
        conditions below and those of :meth:`_road_plan`."""
        d = self.__dict__
        if not (args or kwargs or d["disabled"] or d["merged_adapters"] or inject._MIXED_OPEN or _grad_enabled()
                or type(x) is not torch.Tensor or _autocast() or _compiling() or _tracing_state()):
            plan = d["_road"]
            if plan is None or plan[0] != d["active_adapters"]:
                plan = self._road_plan()
            modules = d["_modules"]
            base = modules["base_layer"].__dict__
            shape = x.shape
            # the base's forward would be just F.linear: inject.plain_linear_params's conditions,
            # inlined (the call costs more than the checks), less the backward hooks, which cannot
            # fire without autograd (JIT tracing is checked above)
            if (plan[1] is x.dtype and shape and shape[-1] == plan[2]
                    and not (base["_forward_pre_hooks"] or base["_forward_hooks"]
                             or _torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks)
                    and "forward" not in base and base.get("_compiled_call_impl") is None):
                params = base["_parameters"]
                mods_a, mods_b, scaling = modules["lora_A"]._modules, modules["lora_B"]._modules, d["scaling"]
                current = params["weight"].data_ptr() == plan[3]  # False: a weight has new storage
                for name, a_ptr, _, b_ptr, _, dropout in plan[5]:
                    if not current or (dropout is not None and dropout.training):
                        break
                    current = (mods_a[name]._parameters["weight"].data_ptr() == a_ptr
                               and mods_b[name]._parameters["weight"].data_ptr() == b_ptr)
                else:
                    if current:
                        n_dim, k = len(shape), plan[2]
                        x2 = (x if n_dim == 2 else x.reshape(shape[0] * shape[1], k) if n_dim == 3
                              else x.reshape(math.prod(shape[:-1]), k))
                        bias = params["bias"]
                        out = torch.mm(x2, plan[4]) if bias is None else torch.addmm(bias, x2, plan[4])
                        for name, _, at, _, bt, _ in plan[5]:
                            out.addmm_(torch.mm(x2, at), bt, alpha=scaling[name])
                        if n_dim == 2:
                            return out
                        if n_dim == 3:
                            return out.view(shape[0], shape[1], d["out_features"])
                        return out.view(*shape[:-1], d["out_features"])
                if not current:
                    d["_road"] = None  # plan anew on the next call
        return LoraLayer.forward(self, x, *args, **kwargs)

    def _road_plan(self) -> tuple:
        """What :meth:`forward`'s no-grad road needs, kept between calls and checked on each
        (``self._road``, dropped by :meth:`_clear_cache`): ``(active adapters, dtype, in_features,
        base weight data pointer, Wᵀ, adapters)``, ``adapters`` a tuple of ``(name, A data pointer,
        Aᵀ, B data pointer, Bᵀ, dropout module or None)``. The dtype is None (road closed) unless
        the base is an exact ``nn.Linear`` and its weight and every active adapter's weights share
        one dtype, with no DoRA and no lora_bias.

        The views are why this pays: making one costs about as much as a thin GEMM's call. A
        weight given new storage (``param.data = ...``, a reload with ``assign=True``) has a new
        data pointer, so the plan is made anew; ``.to()`` and friends drop it (:meth:`_apply`).
        Only used without autograd (views made in inference mode must not meet it)."""
        names = list(self.active_adapters)
        base = self.get_base_layer()
        dtype, w_ptr, wt, adapters = None, 0, None, []
        plain = (nn.Parameter, torch.Tensor)  # not quantized or distributed tensor types
        if type(base) is nn.Linear and self.base_layer is base and type(base.weight) in plain:
            W = base.weight
            dtype, w_ptr, wt = W.dtype, W.data_ptr(), W.t()
            for name in names:
                if name not in self.r:
                    continue
                A, B = self.lora_A[name].weight, self.lora_B[name].weight
                if (self.use_dora[name] or self.lora_bias[name] or A.dtype is not dtype or B.dtype is not dtype
                        or type(A) not in plain or type(B) not in plain):
                    dtype = None
                    break
                dropout = self.lora_dropout[name]
                adapters.append((name, A.data_ptr(), A.t(), B.data_ptr(), B.t(),
                                 None if isinstance(dropout, nn.Identity) else dropout))
        plan = (names, dtype, self.in_features, w_ptr, wt, tuple(adapters))
        if w_ptr:  # not kept for meta tensors (data pointer 0): a later load must plan anew
            self._road = plan
        else:
            plan = (names, None) + plan[2:]
        return plan

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        device = self._adapter_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device)

    def _init_pissa(self, name: str, init: str) -> None:
        base = self.get_base_layer()  # a quantized base gets the residual requantized (QPiSSA)
        weight = dequantize_weight(base)
        w = weight.float().T if self.fan_in_fan_out else weight.float()
        r, s = self.r[name], self.scaling[name]
        if init == "pissa":
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        else:
            niter = int(init.rsplit("_", 1)[1])
            V, S, U = torch.svd_lowrank(w, q=r, niter=niter)
            Uh = U.T
        Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
        A = torch.diag(Sr.sqrt()) @ Uhr
        B = Vr @ torch.diag(Sr.sqrt())
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
            residual = w - s * (B @ A)
            _store_base_weight(base, residual.T if self.fan_in_fan_out else residual)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _dora_weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        w = weight.T if self.fan_in_fan_out else weight
        lora_w = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
        return torch.linalg.norm(w + self.scaling[name] * lora_w.detach(), dim=1)

    def _dora_factor_shape(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # plain dict lookups (not nn.Module attribute access): this runs once per layer per forward
        d = self.__dict__
        modules = d["_modules"]
        A = modules["lora_A"]._modules[name]._parameters["weight"]
        B = modules["lora_B"]._modules[name]._parameters
        dropout = modules["lora_dropout"]._modules[name]
        xa = x if x.dtype is A.dtype else x.to(A.dtype)
        if type(dropout) is not nn.Identity:
            xa = dropout(xa)
        if d["use_dora"][name]:
            return result + self._dora_extra(name, x, xa, result).to(result.dtype)
        weight, bias, s = B["weight"], B["bias"], d["scaling"][name]
        if bias is None and result.dtype is xa.dtype and result.is_contiguous():
            # ``result + s · (x Aᵀ) Bᵀ`` on 2-D views, the second product a GEMM with beta=1: no (…, out)
            # temporary and no separate add pass. (Inference in the plain case takes the no-grad
            # road of :meth:`forward`, which adds in place.)
            h = F.linear(xa.reshape(-1, d["in_features"]), A)
            return torch.addmm(result.view(-1, d["out_features"]), h, weight.t(), alpha=s).view(result.shape)
        h = F.linear(xa, A)
        return torch.add(result, F.linear(h, weight, bias).to(result.dtype), alpha=s)

    def _dora_extra(self, name: str, x: torch.Tensor, xd: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to the base output: ``(f - 1) · (W x) + f · s · B A x`` with f = m / ||W + sBA||."""
        base = self.get_base_layer()
        weight = dequantize_weight(base)
        lora = self.lora_B[name](self.lora_A[name](xd))
        norm = self._dora_weight_norm(name, weight.to(lora.dtype)).detach()
        f = self.lora_magnitude_vector[name].weight / norm
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            w = weight.T if self.fan_in_fan_out else weight
            base_out = F.linear(xd, w.to(xd.dtype))  # the base term must see the same dropout
        else:
            base_out = result.to(lora.dtype)
            if getattr(base, "bias", None) is not None:
                base_out = base_out - base.bias.to(lora.dtype)
        return (f - 1) * base_out + f * self.scaling[name] * lora

    # -- mixed batches ------------------------------------------------------------------------
    def _stacked(self, names: tuple[str, ...], device: torch.device):
        """All adapters' A (n+1, in, r_pad) and s·B (n+1, r_pad, out), slot 0 zeros ("no adapter"),
        ranks zero-padded to the largest (rounded up to a multiple of 8 for grouped matmuls); plus
        the DoRA factors f (n+1, out) (ones for non-DoRA slots) or None, and the scaled lora_B
        biases (n+1, out) or None. Cached while no gradient is needed and no weight changed
        (tracked by tensor versions)."""
        # plain dict lookups (not nn.Module attribute access): this runs on every mixed-batch forward
        mods_a, mods_b = self.lora_A._modules, self.lora_B._modules
        params = [mods_a[n]._parameters["weight"] for n in names] + [mods_b[n]._parameters["weight"] for n in names]
        dora = [n for n in names if self.use_dora[n]]
        params += [self.lora_magnitude_vector[n].weight for n in dora]
        params += [mods_b[n]._parameters["bias"] for n in names if self.lora_bias[n]]
        if dora:
            params.append(self.get_base_layer().weight)
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (names, tuple(p._version for p in params), tuple(self.scaling[n] for n in names), device)
        if not need_grad and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        r_pad = -(-max(self.r[n] for n in names) // 8) * 8
        dtype = self.lora_A[names[0]].weight.dtype
        zero_a = torch.zeros(self.in_features, r_pad, device=device, dtype=dtype)
        zero_b = torch.zeros(r_pad, self.out_features, device=device, dtype=dtype)
        a_list, b_list = [zero_a], [zero_b]
        for n in names:
            pad = r_pad - self.r[n]
            a_list.append(F.pad(self.lora_A[n].weight.T, (0, pad)))
            b_list.append(F.pad(self.lora_B[n].weight.T * self.scaling[n], (0, 0, 0, pad)))
        A, B = torch.stack(a_list), torch.stack(b_list)
        factors = None
        if dora:
            weight = dequantize_weight(self.get_base_layer()).to(dtype)
            ones = torch.ones(self.out_features, device=device, dtype=dtype)
            rows = [ones]
            for n in names:
                if self.use_dora[n]:
                    rows.append(self.lora_magnitude_vector[n].weight / self._dora_weight_norm(n, weight).detach())
                else:
                    rows.append(ones)
            factors = torch.stack(rows)
        bias = None
        if any(self.lora_bias[n] for n in names):
            zeros = torch.zeros(self.out_features, device=device, dtype=dtype)
            bias = torch.stack([zeros] + [self.lora_B[n].bias * self.scaling[n] if self.lora_bias[n] else zeros
                                          for n in names])
        value = (A, B, factors, bias)
        if not need_grad:
            self._stack_cache = (key, value)
        return value

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        names = tuple(self.lora_A.keys())
        if not names:
            return result
        rows = x.shape[0]
        plan = mixed.plan(names, x.device, rows)
        idx = plan.idx
        A, B, factors, bias = self._stacked(names, x.device)
        shape = x.shape
        x3 = x.reshape(rows, -1, shape[-1]).to(A.dtype)
        if self.training:
            x3 = _rowwise_dropout(x3, [0.0] + [_dropout_p(self.lora_dropout[n]) for n in names], idx)
            if factors is not None and any(self.use_dora[n] and _dropout_p(self.lora_dropout[n]) > 0 for n in names):
                raise PeftkitError("Mixed-adapter batches with DoRA and lora_dropout > 0 cannot be trained; "
                                   "set lora_dropout=0 or train one adapter per batch.")
        if factors is None and bias is None and result.dtype == A.dtype and result.is_contiguous():
            # the usual case: add into the base output inside the second batched matmul
            out = _batched_lora(x3, A, B, plan, add_to=result.view(rows, -1, self.out_features), in_place=fresh)
            return out.view(result.shape)
        lora = _batched_lora(x3, A, B, plan)
        if bias is not None:
            lora = lora + bias.index_select(0, idx).unsqueeze(1)
        lora = lora.view(*shape[:-1], self.out_features)
        if factors is None:
            return result + lora.to(result.dtype)
        f = factors.index_select(0, idx).view(shape[0], *([1] * (len(shape) - 2)), self.out_features)
        base = self.get_base_layer()
        base_out = result.to(lora.dtype)
        if getattr(base, "bias", None) is not None:
            base_out = base_out - base.bias.to(lora.dtype)
        return result + ((f - 1) * base_out + f * lora).to(result.dtype)


def _batched_lora(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, plan: Any,
                  add_to: Optional[torch.Tensor] = None, in_place: bool = False) -> torch.Tensor:
    """Row i of ``x3`` (rows, tokens, in) times ``A[idx[i]]`` (in, r) times ``B[idx[i]]`` (r, out),
    plus ``add_to`` (rows, tokens, out) when given (added in the same batched matmul; into
    ``add_to`` itself when ``in_place`` and no gradient is recorded).

    Three equivalent ways, none copying the stacked weights per row unless it must: a batched
    matmul on a slice of the stacks (rows use consecutive slots in order: no copy); a grouped matmul
    over tokens sorted by adapter when many rows share few adapters (inference; its cost grows with
    the number of adapters, so it loses to the next one when most rows have their own); a batched
    matmul on gathered weights (any assignment, and training).
    """
    rows, tokens, d_in = x3.shape
    grad = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x3.requires_grad
                                        or (add_to is not None and add_to.requires_grad))
    copy = grad or not in_place  # add out of place
    if plan.start is not None:
        return _bmm_pair(x3, A.narrow(0, plan.start, rows), B.narrow(0, plan.start, rows), add_to, copy)
    if (not grad and plan.n_slots_used * 4 <= rows and hasattr(F, "grouped_mm")
            and x3.dtype in (torch.float32, torch.bfloat16) and d_in % 8 == 0 and B.shape[-1] % 8 == 0):
        offs, order = plan.groups(tokens, A.shape[0])
        flat = x3.reshape(rows * tokens, d_in)
        if order is not None:
            flat = flat.index_select(0, order)
        out = F.grouped_mm(F.grouped_mm(flat, A, offs=offs), B, offs=offs)
        if order is not None:
            out = torch.empty_like(out).index_copy_(0, order, out)
        out = out.view(rows, tokens, -1)
        return out if add_to is None else (add_to + out if copy else add_to.add_(out))
    return _bmm_pair(x3, A.index_select(0, plan.idx), B.index_select(0, plan.idx), add_to, copy)


def _bmm_pair(x3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add_to: Optional[torch.Tensor],
              copy: bool) -> torch.Tensor:
    """``(x3 @ a) @ b`` (+ ``add_to``, fused into the second batched matmul; into ``add_to`` itself
    unless ``copy``)."""
    h = torch.bmm(x3, a)
    if add_to is None:
        return torch.bmm(h, b)
    return torch.baddbmm(add_to, h, b) if copy else add_to.baddbmm_(h, b)


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _rowwise_dropout(x: torch.Tensor, ps: list[float], idx: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with each row's own probability (x: (batch, ...))."""
    if not any(p > 0 for p in ps):
        return x
    p = torch.tensor(ps, device=x.device, dtype=x.dtype).index_select(0, idx)
    p = p.view(-1, *([1] * (x.dim() - 1)))
    keep = torch.rand_like(x) >= p
    return x * keep / (1 - p)


class Embedding(LoraLayer):
    """LoRA on an embedding table E (num_embeddings x dim)::

        y = E[x] + s · (A^T[x]) B^T,    A (r, num_embeddings) zeros, B (dim, r) ~ N(0, 1)

    DoRA: ``y = f ⊙ (E[x] + s · A^T[x] B^T)`` with ``f = m / ||E^T + s B A||_row`` per embedding
    dimension. ``lora_embedding_A`` / ``lora_embedding_B`` are plain parameters (no ``.weight`` in
    their keys).
    """

    supports_dora = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        if config.lora_bias:
            raise TargetError("lora_bias=True is not supported on embedding layers.")
        device = self._adapter_device()
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=device))

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).T * self.scaling[name]

    def _dora_weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        lora_w = self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()  # (dim, num)
        return torch.linalg.norm(weight.T + self.scaling[name] * lora_w.detach(), dim=1)

    def _dora_factor_shape(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        after_a = self._lookup(x, self.lora_embedding_A[name].T)
        out = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if scale is not None:
            out = out * scale
        if not self.use_dora[name]:
            return result + out.to(result.dtype)
        weight = self.get_base_layer().weight
        f = self.lora_magnitude_vector[name].weight / self._dora_weight_norm(name, weight.float()).detach()
        return (f * result.to(f.dtype) + f * out).to(result.dtype)

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        """Rows gather their adapter's A columns for their tokens, then one batched matmul with B."""
        names = tuple(self.lora_embedding_A.keys())
        if not names:
            return result
        if any(self.use_dora[n] for n in names):
            raise PeftkitError("Mixed-adapter batches are not supported for DoRA on embedding layers.")
        idx = mixed.index(names, x.device, x.shape[0])
        r_max = max(self.r[n] for n in names)
        dtype = self.lora_embedding_A[names[0]].dtype
        A = torch.stack([torch.zeros(self.in_features, r_max, device=x.device, dtype=dtype)]
                        + [F.pad(self.lora_embedding_A[n].T, (0, r_max - self.r[n])) for n in names])
        B = torch.stack([torch.zeros(r_max, self.out_features, device=x.device, dtype=dtype)]
                        + [F.pad(self.lora_embedding_B[n].T * self.scaling[n], (0, 0, 0, r_max - self.r[n]))
                           for n in names])
        rows = idx.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
        after_a = A[rows, x].reshape(x.shape[0], -1, r_max)  # (batch, tokens, r)
        out = torch.bmm(after_a, B.index_select(0, idx)).view(*x.shape, self.out_features)
        scale = getattr(self.get_base_layer(), "embed_scale", None)
        if scale is not None:
            out = out * scale
        return result + out.to(result.dtype)


class ConvNd(LoraLayer):
    """LoRA on an N-d convolution: ``y = conv(x, W) + s · conv1x1(conv(x, A), B)``.

    A: ConvNd(in, r, kernel, stride, padding, dilation), B: ConvNd(r, out, 1, groups=base.groups).
    Weight shapes: A (r, in, *kernel), B (out, r / groups, 1, ...). The update's weight (for merging)
    is the composition of the two convolutions. DoRA's magnitude has shape (1, out, 1, ...).
    """

    supports_dora = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self._conv_dim = base.weight.dim() - 2
        self._conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self._conv_dim]

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        base = self.get_base_layer()
        if r % base.groups:
            raise TargetError(f"LoRA on a conv with groups={base.groups} needs r divisible by groups (got r={r}).")
        if base.padding_mode != "zeros":
            raise TargetError(f"LoRA on convs with padding_mode={base.padding_mode!r} is not supported.")
        cls = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self._conv_dim]
        device = self._adapter_device()
        ones = (1,) * self._conv_dim
        self.lora_A[name] = cls(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                dilation=base.dilation, bias=False, device=device)
        self.lora_B[name] = cls(r, self.out_features, ones, ones, groups=base.groups, bias=config.lora_bias,
                                device=device)

    def delta_weight(self, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        if base.groups > 1:
            raise MergeError("Merging LoRA into a grouped convolution (groups > 1) is not supported.")
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        # B is a 1x1 conv, so the composed kernel is B (out, r) times A (r, in * kernel)
        delta = (B.flatten(1) @ A.flatten(1)).view(base.weight.shape)
        return delta * self.scaling[name]

    def _dora_weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        r = self.r[name]
        lora_w = (self.lora_B[name].weight.float().view(-1, r) @ self.lora_A[name].weight.float().view(r, -1))
        w = weight + self.scaling[name] * lora_w.detach().reshape(weight.shape)
        dims = tuple(range(1, w.dim()))
        return w.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)  # (1, out, 1, ...)

    def _dora_factor_shape(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.transpose(0, 1)  # (out, 1, 1, ...) to scale the weight's rows

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        xa = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))
        lora = self.lora_B[name](self.lora_A[name](xa))
        if not self.use_dora[name]:
            return result + (lora * self.scaling[name]).to(result.dtype)
        base = self.get_base_layer()
        norm = self._dora_weight_norm(name, base.weight.to(lora.dtype)).detach()
        f = self.lora_magnitude_vector[name].weight / norm
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            base_out = self._conv_fn(xa, base.weight.to(xa.dtype), None, base.stride, base.padding,
                                     base.dilation, base.groups)
        else:
            base_out = result.to(lora.dtype)
            if base.bias is not None:
                base_out = base_out - base.bias.to(lora.dtype).view(1, -1, *([1] * self._conv_dim))
        return result + ((f - 1) * base_out + f * self.scaling[name] * lora).to(result.dtype)

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        """Each row its own adapter, as one grouped convolution over the batch (groups = batch)."""
        names = tuple(self.lora_A.keys())
        if not names:
            return result
        if any(self.use_dora[n] for n in names):
            raise PeftkitError("Mixed-adapter batches are not supported for DoRA on conv layers.")
        base = self.get_base_layer()
        idx = mixed.index(names, x.device, x.shape[0])
        r_max = max(self.r[n] for n in names)
        wA = self.lora_A[names[0]].weight
        kernel = wA.shape[2:]
        A = torch.stack([wA.new_zeros((r_max, self.in_features, *kernel))] + [
            F.pad(self.lora_A[n].weight, (0, 0) * self._conv_dim + (0, 0, 0, r_max - self.r[n])) for n in names])
        g = base.groups
        B = torch.stack([wA.new_zeros((self.out_features, r_max // g if r_max % g == 0 else r_max, *([1] * self._conv_dim)))] + [
            _pad_conv_b(self.lora_B[n].weight * self.scaling[n], r_max, g) for n in names])
        batch = x.shape[0]
        xa = x.to(A.dtype)
        if self.training:
            xa = _rowwise_dropout(xa, [0.0] + [_dropout_p(self.lora_dropout[n]) for n in names], idx)
        xa = xa.reshape(1, batch * self.in_features, *x.shape[2:])
        a = A.index_select(0, idx).reshape(batch * r_max, self.in_features, *kernel)
        h = self._conv_fn(xa, a, None, base.stride, base.padding, base.dilation, batch)
        b = B.index_select(0, idx).reshape(batch * self.out_features, *B.shape[2:])
        out = self._conv_fn(h, b, None, 1, 0, 1, batch * g)
        out = out.reshape(batch, self.out_features, *out.shape[2:])
        for n in names:
            if self.lora_bias[n]:
                rows = (idx == names.index(n) + 1).to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
                out = out + rows * (self.lora_B[n].bias * self.scaling[n]).view(1, -1, *([1] * self._conv_dim))
        return result + out.to(result.dtype)


def _pad_conv_b(weight: torch.Tensor, r_max: int, groups: int) -> torch.Tensor:
    """Pad B (out, r/groups, 1..) to rank r_max, keeping each group's input channels together."""
    out, per_group = weight.shape[:2]
    target = r_max // groups
    if per_group == target:
        return weight
    return F.pad(weight, (0, 0) * (weight.dim() - 2) + (0, target - per_group))


# ---------------------------------------------------------------------------------------------
# dispatch


def make_layer(target: nn.Module, config: LoraConfig, adapter_name: str, key: str) -> LoraLayer:
    from transformers.pytorch_utils import Conv1D

    if isinstance(target, nn.Embedding):
        layer: LoraLayer = Embedding(target)
    elif isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = ConvNd(target)
    elif isinstance(target, Conv1D):
        if not config.fan_in_fan_out:
            warnings.warn("transformers Conv1D layers store their weight as (in, out); using fan_in_fan_out=True for them.",
                          PeftkitWarning, stacklevel=4)
        layer = Linear(target, fan_in_fan_out=True)
    elif isinstance(target, nn.Linear) or getattr(target, "is_quantized_linear", False):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True is ignored for nn.Linear layers (their weight is (out, in)).", PeftkitWarning,
                          stacklevel=4)
        layer = Linear(target, fan_in_fan_out=False)
    else:
        raise TargetError(
            f"Target module {key} ({type(target).__name__}) is not supported by LoRA. Supported: nn.Linear, "
            "nn.Embedding, nn.Conv1d/2d/3d, transformers Conv1D and peftkit quantized linears; target its "
            "linear submodules instead."
        )
    layer.update_layer(adapter_name, config, key)
    return layer


register_method(Method(
    peft_type=PeftType.LORA,
    config_cls=LoraConfig,
    layer_types=(LoraLayer,),
    make_layer=make_layer,
    prefix="lora_",
    default_targets=DEFAULT_TARGETS,
))


# ---------------------------------------------------------------------------------------------
# combining adapters (add_weighted_adapter)


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
