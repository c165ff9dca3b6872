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

import math
import types
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType, positive_int, probability, register_config
from ..errors import ConfigError, PeftkitError, TargetError
from ..inject import AdapterLayer, MixedBatch, _outer_modules, current_mixed_batch, is_target, model_type_of
from . import Method, register_method
from .lora import _dropout_p, _rowwise_dropout
from .selective import _as_list, _no_match, _outermost

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

_LLAMA = {"attention_output_modules": ["self_attn.o_proj"], "ffn_output_modules": ["mlp.down_proj"],
          "parallel_modules": ["mlp"], "parallel_input": "input"}
_BERT = {"attention_output_modules": r".*\.attention\.output\.dense", "ffn_output_modules": r".*\.layer\.\d+\.output\.dense",
         "parallel_modules": r".*\.layer\.\d+\.output", "parallel_input": "residual"}
_T5 = {"attention_output_modules": ["SelfAttention.o"], "ffn_output_modules": ["DenseReluDense.wo"],
       "parallel_modules": ["DenseReluDense"], "parallel_input": "input"}

# Default placement per model type.
DEFAULT_PLACEMENT: dict[str, dict[str, Any]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "gpt2": {"attention_output_modules": ["attn.c_proj"], "ffn_output_modules": ["mlp.c_proj"],
             "parallel_modules": ["mlp"], "parallel_input": "input"},
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "t5": _T5, "mt5": _T5,
}

# the placement fields each style uses
STYLE_FIELDS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention_output_modules", "ffn_output_modules"),
    "pfeiffer": ("ffn_output_modules",),
    "parallel": ("parallel_modules",),
}


@register_config
@dataclass
class BottleneckConfig(PeftConfig):
    """Config of bottleneck adapters.

    Args:
        style: "houlsby" (after attention and after the FFN), "pfeiffer" (after the FFN) or
            "parallel" (beside the FFN).
        reduction_factor: bottleneck size ``m = hidden // reduction_factor`` (must leave m >= 1).
        bottleneck_size: ``m`` directly (overrides reduction_factor).
        non_linearity: "relu", "gelu", "gelu_new", "silu"/"swish" or "tanh".
        use_layer_norm: a LayerNorm on the adapter input.
        scaling: ``s``; ``None`` means 4.0 for "parallel" (He et al.) and 1.0 otherwise.
        adapter_dropout: dropout on the bottleneck activations, in [0, 1).
        init_weights: zero the up-projection (a no-op start); ``False`` leaves it random.
        attention_output_modules: where the "after attention" adapters go (houlsby).
        ffn_output_modules: where the "after FFN" adapters go (houlsby, pfeiffer).
        parallel_modules: the FFN blocks the parallel adapters run beside (parallel).
        parallel_input: "input" (adapter reads the block's input, adds to its output) or "residual"
            (the block is called as ``M(h, r)`` and adds ``r`` itself; the adapter reads ``r`` and
            ``M(h, r + A(r))`` is called). ``None``: the model type's default, else "input".
        exclude_modules / layers_to_transform / layers_pattern: as in LoraConfig.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).

    The ``*_modules`` fields default (``None``) to the placement of the model type (Llama, Mistral,
    Qwen2/3, Gemma, GPT-2, BERT, RoBERTa, T5); other models must set the fields their style uses.
    """

    PEFT_TYPE = PeftType.BOTTLENECK

    style: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: Optional[int] = None
    non_linearity: Literal["relu", "gelu", "gelu_new", "silu", "swish", "tanh"] = "relu"
    use_layer_norm: bool = False
    scaling: Optional[float] = None
    adapter_dropout: float = 0.0
    init_weights: bool = True
    attention_output_modules: Optional[Union[list[str], str]] = None
    ffn_output_modules: Optional[Union[list[str], str]] = None
    parallel_modules: Optional[Union[list[str], str]] = None
    parallel_input: Optional[Literal["input", "residual"]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        positive_int(self, "reduction_factor", self.reduction_factor)
        if self.bottleneck_size is not None:
            positive_int(self, "bottleneck_size", self.bottleneck_size)
        probability(self, "adapter_dropout", self.adapter_dropout)
        if self.scaling is not None and not math.isfinite(self.scaling):
            raise ConfigError(f"BottleneckConfig.scaling must be a finite number, got {self.scaling!r}.")
        for name in ("attention_output_modules", "ffn_output_modules", "parallel_modules", "exclude_modules",
                     "layers_pattern", "modules_to_save"):
            setattr(self, name, _as_list(getattr(self, name)))
        if self.parallel_input is not None and self.style != "parallel":
            raise ConfigError(f"BottleneckConfig.parallel_input is only used with style='parallel', not {self.style!r}.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("BottleneckConfig.layers_pattern is only used together with layers_to_transform.")

    @property
    def placement(self) -> str:
        """How a targeted module is wrapped: "output" (sequential), "input" or "residual" (parallel)."""
        return "output" if self.style != "parallel" else (self.parallel_input or "input")

    @property
    def scale(self) -> float:
        return float(self.scaling) if self.scaling is not None else (4.0 if self.style == "parallel" else 1.0)


def prepare(config: BottleneckConfig, model: nn.Module) -> None:
    """Fill the placement fields of the style from the model type's defaults."""
    model_type = model_type_of(model)
    defaults = DEFAULT_PLACEMENT.get(model_type)
    fields = STYLE_FIELDS[config.style]
    missing = [f for f in fields if getattr(config, f) is None]
    if missing and defaults is None:
        raise ConfigError(
            f"BottleneckConfig(style={config.style!r}) needs {' and '.join(fields)}, and peftkit has no default "
            f"placement for model type {model_type!r}; set {', '.join(missing)} (module names or a regex)."
        )
    for f in missing:
        value = defaults[f]
        setattr(config, f, list(value) if isinstance(value, list) else value)
    if config.style == "parallel" and config.parallel_input is None:
        config.parallel_input = defaults["parallel_input"] if "parallel_modules" in missing else "input"


def find_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    keys: list[str] = []
    for f in STYLE_FIELDS[config.style]:
        spec = types.SimpleNamespace(
            target_modules=getattr(config, f), exclude_modules=config.exclude_modules,
            modules_to_save=config.modules_to_save, layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern)
        found = [k for k, m in _outer_modules(model) if k and is_target(spec, k, m)]  # type: ignore[arg-type]
        if not found:
            raise TargetError(_no_match(model, f, getattr(config, f)))
        keys += found
    if len(_outermost(keys)) != len(dict.fromkeys(keys)):
        raise TargetError("BottleneckConfig: the attention and FFN placements overlap (one module inside another); "
                          "give attention_output_modules and ffn_output_modules disjoint modules.")
    return list(dict.fromkeys(keys))


def _in_out(module: nn.Module) -> Optional[tuple[int, int]]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear) or getattr(module, "is_quantized_linear", False):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def hidden_size(module: nn.Module, placement: str, key: str) -> int:
    """The size ``d`` of the hidden state the adapter sees at this module."""
    own = _in_out(module)
    linears = [own] if own is not None else [io for m in module.modules() if (io := _in_out(m)) is not None]
    if not linears:
        raise TargetError(f"{key} ({type(module).__name__}): bottleneck adapters wrap linear layers or blocks containing "
                          "them; this module has no linear layer to read the hidden size from.")
    if placement == "output" or placement == "residual":
        return linears[-1][1]
    d_in, d_out = linears[0][0], linears[-1][1]
    if d_in != d_out:
        raise TargetError(f"{key}: a parallel adapter needs a block whose input and output sizes agree; "
                          f"{type(module).__name__} maps {d_in} -> {d_out}.")
    return d_in


class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on one module (see the module doc for the math).

    ``placement``: "output" ``y = M(x) + Σ_a A_a(M(x))``; "input" ``y = M(x) + Σ_a A_a(x)``;
    "residual" ``y = M(h, r + Σ_a A_a(r))``. Per adapter: ``adapter_down[a]`` Linear(d, m),
    ``adapter_up[a]`` Linear(m, d), optional ``adapter_ln[a]`` LayerNorm(d).
    """

    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_ln")
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
            z = _rowwise_dropout(z, [0.0] + [_dropout_p(self.adapter_dropout[n]) for n in names], idx)
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


register_method(Method(
    peft_type=PeftType.BOTTLENECK,
    config_cls=BottleneckConfig,
    layer_types=(BottleneckLayer,),
    make_layer=make_layer,
    prefix="adapter_",
    prepare=prepare,
    find_targets=find_targets,
))
