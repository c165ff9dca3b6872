"""LoRA on a bare ``nn.Parameter`` (``LoraConfig.target_parameters``), e.g. MoE expert tensors.

Some modules use a parameter directly rather than through a linear layer: the experts of MoE
layers in transformers 5 hold all experts in one 3-D tensor (``experts.gate_up_proj`` of shape
(E, 2·inter, hidden) in Qwen3-MoE / Mixtral, (E, hidden, 2·inter) in gpt-oss, which marks its
experts ``is_transposed``). :class:`ParamWrapper` wraps the module that owns the parameter and,
for the duration of the module's forward, replaces the parameter by ``W + ΔW`` through a
``torch.nn.utils.parametrize`` parametrization (computed once per forward, however often the module
reads it). Reading ``wrapper.get_base_layer().<name>`` outside a forward gives the frozen ``W``.

Shapes and layout (as Hugging Face PEFT, so checkpoints are interchangeable). A 2-D parameter
(out, in) is one expert, ``E = 1``. A 3-D parameter holds ``E`` experts, (E, out, in), or
(E, in, out) when the module has ``is_transposed = True``. With rank ``r``::

    lora_A: (E·r, in)      A_e = lora_A[e·r : (e+1)·r]          (expert-major rows)
    lora_B: (out, E·r)     B_e = lora_B[:, e :: E]              (rank-major columns)
    ΔW_e = s · B_e A_e     (out, in);  stored transposed, (in, out), for is_transposed experts
    s = lora_alpha / r     (rsLoRA: lora_alpha / sqrt(r))

Each wrapper adapts one parameter; to adapt several parameters of one module the wrappers nest
(the module's first parameter innermost), so the file keys read ``experts.base_layer.lora_A.weight``
for the first and ``experts.lora_A.weight`` for the second. Several adapters share the wrappers
(all adapters must adapt the same parameters). Not supported (PeftkitError saying so):
``lora_dropout`` (the dropout of x cannot be folded into W), ``use_dora``, ``lora_bias``,
``fan_in_fan_out``, PiSSA init, mixed-adapter batches, ``add_weighted_adapter``, and merging into a
parameter that already has a parametrization of its own (the forward works).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core.memory import check_new_tensors
from ...core.mixed import current_mixed_batch
from ...errors import ConfigError, MergeError, PeftkitError, TargetError
from .config import LoraConfig
from .layer import LoraLayer

# dtypes a parameter may have to be adapted (the fold runs in the parameter's dtype)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def read_parameter(module: nn.Module, name: str, key: str) -> torch.Tensor:
    """The value of ``module.<name>`` (through a parametrization if it has one); TargetError unless it
    is a 2-D or 3-D float ``nn.Parameter`` (or a parametrized one)."""
    if parametrize.is_parametrized(module, name):
        with torch.no_grad():
            value = getattr(module, name)
    else:
        value = module._parameters.get(name) if name in module._parameters else getattr(module, name, None)
        if not isinstance(value, nn.Parameter):
            raise TargetError(f"{key} is a {type(value).__name__}, not an nn.Parameter; target_parameters adapts "
                              "parameters only.")
    if value.dtype not in FLOAT_DTYPES:
        raise TargetError(f"{key} has dtype {value.dtype}; LoRA adapts float32/float64/float16/bfloat16 parameters "
                          "only (quantized or integer parameters cannot take a low-rank delta).")
    if value.dim() not in (2, 3):
        raise TargetError(f"{key} has shape {tuple(value.shape)}; LoRA adapts 2-D parameters (out, in) and 3-D "
                          "expert parameters (experts, out, in) only.")
    return value


class LoraFold(nn.Module):
    """The parametrization: ``W -> W + Σ s·lhs @ rhs`` over the active adapters' factors, folded with
    ``baddbmm`` in ``W``'s dtype (no delta the size of ``W`` is formed; autocast is off, as a
    parametrization may not change the dtype)."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        super().__init__()
        self.factors = factors

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=W.device.type, enabled=False):
            out = W if W.dim() == 3 else W.unsqueeze(0)
            for lhs, rhs, s in self.factors:
                out = torch.baddbmm(out, lhs.to(W.dtype), rhs.to(W.dtype), alpha=s)
            return out.view(W.shape)


class ParamWrapper(LoraLayer):
    """LoRA on one parameter of the wrapped module (see the module doc for shapes and math).

    ``parameter_name`` names the parameter; ``num_experts`` is ``E``; ``in_features`` /
    ``out_features`` are the input / output sizes of one expert; ``stores_in_out``: a 3-D parameter
    laid out (E, in, out) (the module's ``is_transposed``).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, key: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        value = read_parameter(self.get_base_layer(), parameter_name, key)
        self.param_shape = tuple(value.shape)
        self.num_experts = value.shape[0] if value.dim() == 3 else 1
        self.stores_in_out = value.dim() == 3 and bool(getattr(self.get_base_layer(), "is_transposed", False))
        if self.stores_in_out:
            self.in_features, self.out_features = value.shape[1], value.shape[2]
        else:
            self.in_features, self.out_features = value.shape[-1], value.shape[-2]

    # -- creation -----------------------------------------------------------------------------
    def get_param(self) -> torch.Tensor:
        """The parameter as the module reads it (outside a forward: without LoRA)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _adapter_device(self) -> torch.device:
        return self.get_param().device

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        check_param_config(config, key)
        r, alpha = config.rank_for(key), config.alpha_for(key)
        if r <= 0:
            raise ConfigError(f"{key}: rank must be > 0, got {r}.")
        rows = r * self.num_experts
        device = self._adapter_device()
        check_new_tensors(f"{key}: LoRA r={r} x {self.num_experts} experts",
                          [(rows, self.in_features), (self.out_features, rows)], device, "Use a smaller r (or rank_pattern)")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rows, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(rows, self.out_features, bias=False, device=device)
        self._init_weights(adapter_name, config.init_lora_weights)
        self.clear_cache()

    # -- the delta ----------------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(lhs, rhs, s)`` with ``ΔW = s · lhs @ rhs`` per expert, in the parameter's layout:
        (E, out, r) and (E, r, in), or (E, in, r) and (E, r, out) for (E, in, out) parameters."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        E = self.num_experts
        a = A.reshape(E, -1, A.shape[-1])  # (E, r, in): rows expert-major
        b = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (E, out, r): columns rank-major
        if self.stores_in_out:
            return a.transpose(1, 2), b.transpose(1, 2), self.scaling[name]
        return b, a, self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the shape of the parameter, float32."""
        lhs, rhs, s = self.factors(name)
        return (torch.bmm(lhs.float(), rhs.float()) * s).view(self.param_shape)

    @contextlib.contextmanager
    def folded(self, names: Sequence[str]) -> Iterator[None]:
        """Inside the context the base module reads its parameter as ``W + Σ ΔW`` of ``names`` (computed
        once); afterwards the module is as before (parameter object, order and parametrizations)."""
        base = self.get_base_layer()
        fold = LoraFold([self.factors(n) for n in names])
        order = list(base._parameters)
        had_own = parametrize.is_parametrized(base, self.parameter_name)
        unsafe = base.parametrizations[self.parameter_name].unsafe if had_own else False
        parametrize.register_parametrization(base, self.parameter_name, fold, unsafe=True)
        try:
            with parametrize.cached():
                yield
        finally:
            if had_own:
                chain = base.parametrizations[self.parameter_name]
                del chain[[i for i, m in enumerate(chain) if m is fold][0]]
                chain.unsafe = unsafe
            else:
                parametrize.remove_parametrizations(base, self.parameter_name, leave_parametrized=False)
                if list(base._parameters) != order:  # put the parameter back in its place
                    params = base._parameters
                    base.__dict__["_parameters"] = {k: params[k] for k in order if k in params} | {
                        k: v for k, v in params.items() if k not in order}

    # -- running ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Disabled: the base module as is (merged adapters are unmerged first). Otherwise the base
        module with the active, unmerged adapters folded into its parameter."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if current_mixed_batch() is not None:
            raise PeftkitError("lora.ParamWrapper does not support mixed adapter batches yet (adapter_names): "
                               f"{self.parameter_name!r} is adapted through target_parameters. Run one adapter per batch.")
        names = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        with self.folded(names):
            return self.base_layer(*args, **kwargs)

    # -- merging ------------------------------------------------------------------------------
    def _target(self) -> nn.Parameter:
        base = self.get_base_layer()
        if parametrize.is_parametrized(base, self.parameter_name):
            raise MergeError(f"{self.parameter_name!r} has a parametrization of its own, so a LoRA delta cannot be "
                             "merged into it (the forward works unmerged); use unload() instead.")
        return base._parameters[self.parameter_name]

    def check_merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        param = self._target()
        if not safe_merge:
            return
        with torch.no_grad():
            merged = param.float()
            for name in names:
                merged = merged + self.delta_weight(name)
                if not torch.isfinite(merged.to(param.dtype)).all():
                    raise MergeError(f"Merging adapter {name!r} gives NaN/inf weights; the adapter is broken. "
                                     "Nothing was merged.")

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        param = self._target()
        with torch.no_grad():
            new = param + self.delta_weight(name).to(param.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise MergeError(f"Merging adapter {name!r} gives NaN/inf weights; the adapter is broken. "
                                 "Nothing was merged.")
            param.copy_(new)

    def _unmerge_one(self, name: str) -> None:
        param = self._target()
        with torch.no_grad():
            param.sub_(self.delta_weight(name).to(param.dtype))

    def extra_repr(self) -> str:
        return (f"parameter_name={self.parameter_name!r}, in_features={self.in_features}, "
                f"out_features={self.out_features}, num_experts={self.num_experts}, {super().extra_repr()}")


def check_param_config(config: LoraConfig, key: str) -> None:
    """PeftkitError naming the first LoRA feature ``config`` sets that parameter targets do not support."""
    unsupported = [
        ("lora_dropout != 0", config.lora_dropout > 0, "dropout of the input cannot be folded into the weight"),
        ("use_dora=True", config.use_dora, "DoRA"),
        ("lora_bias=True", config.lora_bias, "B has no bias to add to a bare parameter"),
        ("fan_in_fan_out=True", config.fan_in_fan_out, "the layout comes from the parameter's shape"),
        (f"init_lora_weights={config.init_lora_weights!r}",
         isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith("pissa"), "PiSSA"),
    ]
    for what, bad, why in unsupported:
        if bad:
            raise ConfigError(f"lora.ParamWrapper does not work with {what} ({key} is targeted through "
                              f"target_parameters: {why}); use target_modules for such adapters.")


def make_param_layer(target: nn.Module, config: LoraConfig, adapter_name: str, key: str,
                     parameter_name: str) -> ParamWrapper:
    """A :class:`ParamWrapper` around ``target`` (a module, or the wrapper of another of its
    parameters) adapting ``parameter_name``, holding adapter ``adapter_name``."""
    check_param_config(config, key)
    layer = ParamWrapper(target, parameter_name, key)
    layer.update_layer(adapter_name, config, key)
    return layer


__all__ = ["FLOAT_DTYPES", "LoraFold", "ParamWrapper", "check_param_config", "make_param_layer", "read_parameter"]
