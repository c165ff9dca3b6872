"""The one injection engine: target matching, module replacement, unloading.

A method contributes a config and layer classes (see :mod:`peftkit.methods`); this module finds the
targeted submodules, wraps each in the method's :class:`AdapterLayer` (which keeps the original as
``base_layer``), and undoes that. Nothing here knows any method's math.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from .errors import AdapterNameError, MergeError, PeftkitError, TargetError, closest

if TYPE_CHECKING:
    from .config import PeftConfig

BASE_ADAPTER = "__base__"  # row name for "no adapter" in mixed batches

# Layer name patterns used by ``layers_to_transform`` when ``layers_pattern`` is not given.
DEFAULT_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")


# ---------------------------------------------------------------------------------------------
# mixed-adapter batches


@dataclass
class MixedBatch:
    """Which adapter each row of the current batch uses (set by ``PeftModel.forward(adapter_names=...)``).

    Layers turn the names into an index into their own stacked adapter weights with :meth:`index`;
    the result is cached per adapter order so that a forward computes it once per distinct order.
    """

    names: tuple[str, ...]
    _cache: dict = field(default_factory=dict)

    def index(self, slots: tuple[str, ...], device: torch.device, batch: int) -> torch.Tensor:
        """Row -> slot index, slot 0 being "no adapter"; ``slots`` are a layer's adapters in order."""
        key = (slots, device)
        idx = self._cache.get(key)
        if idx is None:
            pos = {name: i + 1 for i, name in enumerate(slots)}
            idx = torch.tensor([pos.get(n, 0) for n in self.names], dtype=torch.long, device=device)
            self._cache[key] = idx
        if batch != idx.numel():
            if batch % idx.numel():
                raise PeftkitError(
                    f"adapter_names has {idx.numel()} entries but the batch has {batch} rows; give one name per row."
                )
            # generate() expands rows for beams / num_return_sequences: row i -> rows i*k..i*k+k-1
            idx = idx.repeat_interleave(batch // idx.numel())
        return idx

    def plan(self, slots: tuple[str, ...], device: torch.device, batch: int) -> "RowPlan":
        """The row -> slot index with what layers need to avoid copying weights (cached like :meth:`index`)."""
        key = ("plan", slots, device, batch)
        plan = self._cache.get(key)
        if plan is None:
            plan = RowPlan(self.index(slots, device, batch))
            self._cache[key] = plan
        return plan


class RowPlan:
    """A batch's slot per row, and the groupings layers use for batched adapter matmuls.

    ``start``: when rows use consecutive slots ``start, start+1, ...`` in order (each row its own
    adapter, in slot order), layers can slice their stacked weights instead of gathering them.
    ``n_slots_used``: distinct slots among the rows. :meth:`groups` sorts tokens by slot for grouped
    matmuls (``torch.nn.functional.grouped_mm``).
    """

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx
        values = idx.tolist()
        first = values[0] if values else 0
        self.start = first if values == list(range(first, first + len(values))) else None
        self.n_slots_used = len(set(values))
        self._sorted = all(a <= b for a, b in zip(values, values[1:]))  # host-side: no device sync
        self._groups: dict = {}

    def groups(self, tokens_per_row: int, n_slots: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``offs`` (n_slots,) int32 cumulative token counts per slot, and the token order that sorts
        tokens by slot (``None`` when they already are)."""
        key = (tokens_per_row, n_slots)
        hit = self._groups.get(key)
        if hit is None:
            slots = self.idx.repeat_interleave(tokens_per_row) if tokens_per_row > 1 else self.idx
            offs = torch.bincount(slots, minlength=n_slots).cumsum(0).to(torch.int32)
            order = None if self._sorted else torch.argsort(slots, stable=True)  # repeating rows keeps the order
            hit = self._groups[key] = (offs, order)
        return hit


_MIXED: contextvars.ContextVar[Optional[MixedBatch]] = contextvars.ContextVar("peftkit_mixed_batch", default=None)


def model_type_of(model: nn.Module) -> Optional[str]:
    """The transformers ``config.model_type`` of ``model`` (None for a plain nn.Module)."""
    return getattr(getattr(model, "config", None), "model_type", None)


# How many mixed batches are open, in any thread. Layers read it before the ContextVar: with none
# open (the usual case) no ContextVar is read, which is cheaper on every layer's forward and lets
# torch.compile trace the layers (it cannot trace ``ContextVar.get``; it guards on this global).
_MIXED_OPEN = 0
_MIXED_OPEN_LOCK = threading.Lock()


def current_mixed_batch() -> Optional[MixedBatch]:
    """The batch being routed in this thread / task (set by :class:`mixed_batch`), or None."""
    return _MIXED.get() if _MIXED_OPEN else None


_tracing_state = torch._C._get_tracing_state


def plain_linear_params(base: nn.Module) -> Optional[dict]:
    """The ``_parameters`` of ``base`` when calling it would run just ``F.linear(x, weight, bias)``:
    an exact ``nn.Linear`` with no hooks (its own or global), no instance-level ``forward``, no
    ``torch.compile`` wrapper and no JIT tracing. Otherwise None.

    Layers use it to compute the base product themselves, without ``nn.Module``'s call
    bookkeeping, which on a CPU decode step costs about as much as a rank-16 GEMM. The module's
    state is read from its ``__dict__`` (``nn.Module`` attribute reads are several times slower
    than dict reads)."""
    if type(base) is nn.Linear:
        d = base.__dict__
        if (not (d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"] or d["_backward_hooks"])
                and d.get("_compiled_call_impl") is None and "forward" not in d
                and not (_torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks
                         or _torch_module._global_backward_pre_hooks or _torch_module._global_backward_hooks)
                and not _tracing_state()):
            return d["_parameters"]
    return None


def call_base(base: nn.Module, x: Any, args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """``base(x, *args, **kwargs)``, and whether that output is fresh: made here, seen by no hook,
    so the caller may add into it in place. A plain ``nn.Linear`` (:func:`plain_linear_params`) is
    computed as ``F.linear`` directly; anything else goes through ``__call__``."""
    if not args and not kwargs:
        params = plain_linear_params(base)
        if params is not None:
            return F.linear(x, params["weight"], params["bias"]), True
    return base(x, *args, **kwargs), False


class mixed_batch:
    """Context manager: route each row of the batches run inside it to its own adapter."""

    def __init__(self, names: Optional[Sequence[str]]):
        self.batch = MixedBatch(tuple(names)) if names is not None else None
        self._token = None

    def __enter__(self) -> Optional[MixedBatch]:
        global _MIXED_OPEN
        self._token = _MIXED.set(self.batch)
        if self.batch is not None:
            with _MIXED_OPEN_LOCK:
                _MIXED_OPEN += 1
        return self.batch

    def __exit__(self, *exc: Any) -> None:
        global _MIXED_OPEN
        _MIXED.reset(self._token)
        if self.batch is not None:
            with _MIXED_OPEN_LOCK:
                _MIXED_OPEN -= 1


# ---------------------------------------------------------------------------------------------
# the layer protocol


class AdapterLayer(nn.Module):
    """Base of every wrapper layer. Keeps the wrapped module as ``base_layer``; adapters are named.

    Subclasses list the attributes that hold per-adapter tensors in ``adapter_layer_names``
    (``nn.ModuleDict`` / ``nn.ParameterDict`` keyed by adapter name) and per-adapter settings in
    ``other_param_names`` (plain dicts). Forward has four states: disabled (base only), merged (base
    only, the weights hold the delta), active adapters (base + their deltas), mixed batch (each row
    its own adapter).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    # in-memory key suffix -> file key suffix, applied after the adapter name is removed
    save_key_renames: dict[str, str] = {}
    mergeable: bool = True
    merge_hint: str = ""  # why a non-mergeable layer cannot be merged (appended to the error)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models read e.g. ``layer.weight.dtype``)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    def _adapter_device(self) -> torch.device:
        """Where new adapter tensors go: the device of the base layer's first parameter or buffer."""
        base = self.get_base_layer()
        first = next(itertools.chain(base.parameters(), base.buffers()), None)
        return torch.device("cpu") if first is None else first.device

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    def update_layer(self, adapter_name: str, config: "PeftConfig", key: str) -> None:
        """Create (or re-create) the tensors of ``adapter_name`` for this layer."""
        raise NotImplementedError

    def set_adapter(self, names: Sequence[str], trainable: bool = True) -> None:
        """Activate ``names`` (those this layer has); their tensors train if ``trainable``. Drops the
        layer's caches (so this is also how to make it see weights replaced through ``.data``)."""
        self.active_adapters = [n for n in names if n in self.adapter_names]
        self._clear_cache()
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for name, value in container.items():
                want = trainable and name in self.active_adapters
                params = [value] if isinstance(value, nn.Parameter) else list(value.parameters())
                for p in params:
                    p.requires_grad_(want)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"Adapter {name!r} is merged into {type(self).__name__}; unmerge it before deleting.")
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._clear_cache()

    def _clear_cache(self) -> None:
        """Drop tensors cached from adapter weights (subclasses with caches override)."""

    def adapter_param_items(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(local in-memory key, tensor) for every tensor of adapter ``name``."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if name not in container:
                continue
            value = container[name]
            if isinstance(value, nn.Parameter):
                yield f"{attr}.{name}", value
            else:
                for k, p in value.named_parameters():
                    yield f"{attr}.{name}.{k}", p

    def file_key(self, local_key: str, name: str) -> str:
        """The checkpoint key of an in-memory key: the adapter name removed (Hugging Face rule)."""
        key = strip_adapter_name(local_key, name)
        for old, new in self.save_key_renames.items():
            if key == old or key.endswith("." + old):
                key = key[: len(key) - len(old)] + new
        return key

    # -- merging ------------------------------------------------------------------------------
    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        if not self.mergeable:
            raise MergeError(f"{type(self).__name__} adapters cannot be merged into the base weights.{self.merge_hint}")
        names = self.active_adapters if adapter_names is None else [n for n in adapter_names if n in self.adapter_names]
        for name in names:
            if name in self.merged_adapters:
                continue
            self._merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Disabled: the base only (merged adapters are unmerged first). Mixed batch: each row its own
        adapter (:meth:`_mixed_forward`). Otherwise the active adapters (:meth:`_active_forward`)."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        mixed = current_mixed_batch()
        if mixed is not None:
            self._check_mixed()
            return self._mixed_forward(x, args, kwargs, mixed)
        return self._active_forward(x, args, kwargs)

    def _active_forward(self, x: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _mixed_forward(self, x: Any, args: tuple, kwargs: dict, mixed: "MixedBatch") -> Any:
        raise NotImplementedError

    def _check_mixed(self) -> None:
        if self.merged:
            raise MergeError("adapter_names (mixed batches) cannot be used while adapters are merged; unmerge first.")

    def _merge_one(self, name: str, safe_merge: bool) -> None:
        raise MergeError(f"{type(self).__name__} does not support merging.")

    def _unmerge_one(self, name: str) -> None:
        raise MergeError(f"{type(self).__name__} does not support unmerging.")

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


def strip_adapter_name(key: str, name: str) -> str:
    """``v_proj.lora_A.default.weight`` -> ``v_proj.lora_A.weight``; ``emb.lora_embedding_A.default`` ->
    ``emb.lora_embedding_A``. Only the end of the key is edited, so module names equal to the
    adapter name are safe."""
    suffix = "." + name
    if key.endswith(suffix):
        return key[: -len(suffix)]
    head, _, last = key.rpartition(".")
    if head.endswith(suffix):
        return head[: -len(suffix)] + "." + last
    return key


def run_rows_by_slot(x: torch.Tensor, idx: torch.Tensor, module_for_slot: Any, args: tuple = (),
                     kwargs: Optional[dict] = None) -> torch.Tensor:
    """Each row ``i`` of ``x`` through ``module_for_slot(idx[i])``: arbitrary modules cannot be batched
    by weight gathering, so each distinct slot in the batch runs once on its rows."""
    out = None
    for slot in torch.unique(idx).tolist():
        rows = (idx == slot).nonzero().squeeze(1)
        part = module_for_slot(slot)(x.index_select(0, rows), *args, **(kwargs or {}))
        if out is None:
            out = part.new_zeros((x.shape[0],) + tuple(part.shape[1:]))
        out.index_copy_(0, rows, part)
    return out


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full: each adapter gets its own copy; the original stays for disabling.

    In memory ``lm_head.modules_to_save.<name>.weight``, in the file ``lm_head.weight``.
    """

    adapter_layer_names = ("modules_to_save",)
    mergeable = False

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters = []
        self.merged_adapters = []
        self.disabled = False

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.original_module

    @property
    def weight(self) -> torch.Tensor:  # models that tie or inspect head weights read this
        return self._active_module().weight

    def update_layer(self, adapter_name: str, config: Any = None, key: str = "") -> None:
        import copy

        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_

    def file_key(self, local_key: str, name: str) -> str:
        prefix = f"modules_to_save.{name}."
        return local_key[len(prefix):] if local_key.startswith(prefix) else local_key

    def _active_module(self) -> nn.Module:
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mixed = current_mixed_batch()
        if mixed is None or self.disabled:
            return self._active_module()(x, *args, **kwargs)
        slots = tuple(self.modules_to_save.keys())
        idx = mixed.index(slots, x.device, x.shape[0])
        return run_rows_by_slot(x, idx, lambda s: self.original_module if s == 0 else self.modules_to_save[slots[s - 1]],
                                args, kwargs)

    def unwrap(self, merge: bool) -> nn.Module:
        return self._active_module() if merge else self.original_module


# ---------------------------------------------------------------------------------------------
# target matching


def _layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(m.group("idx")) if m else None
    for pattern in patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
        if m:
            return int(m.group("idx"))
    return None


def _matches_list(key: str, names: Any) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def excluded(config: "PeftConfig", key: str) -> bool:
    """Whether ``exclude_modules`` names module ``key``."""
    exclude = getattr(config, "exclude_modules", None)
    return bool(exclude) and _matches_list(key, exclude)


def in_modules_to_save(config: "PeftConfig", key: str) -> bool:
    """Whether module ``key`` is (inside) one of ``modules_to_save``: never an adapter target."""
    names = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in names)


def closest_module_names(model: nn.Module, targets: Any) -> list[str]:
    """Module names of ``model`` nearest to the wanted ``targets`` (a name or a list), for error hints."""
    names = [k for k, _ in _outer_modules(model) if k]
    want = [targets] if isinstance(targets, str) else list(targets or [])
    hints: list[str] = []
    for t in want:
        hints += closest(t, names, n=5)
    return list(dict.fromkeys(hints))


def is_target(config: "PeftConfig", key: str, module: nn.Module, all_linear: Optional[set[str]] = None) -> bool:
    """Whether module ``key`` is targeted by ``config`` (target_modules, exclude_modules, layer filters)."""
    if excluded(config, key) or in_modules_to_save(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if targets == "all-linear":
        found = all_linear is not None and key in all_linear
    else:
        found = _matches_list(key, targets)
    if not found:
        return False
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is not None and not (isinstance(indexes, list) and len(indexes) == 0):
        idx = _layer_index(key, getattr(config, "layers_pattern", None) or DEFAULT_LAYERS_PATTERN)
        if idx is None:
            return False
        wanted = [indexes] if isinstance(indexes, int) else indexes
        return idx in wanted
    return True


def linear_module_names(model: nn.Module) -> set[str]:
    """Every linear layer (nn.Linear, transformers Conv1D, quantized linears) except the output head."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for key, module in _outer_modules(model):
        if isinstance(module, AdapterLayer):
            module = module.get_base_layer()
        if isinstance(module, (nn.Linear, Conv1D)) or getattr(module, "is_quantized_linear", False):
            names.add(key)
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    for key, module in model.named_modules():
        if head is not None and module is head:
            names.discard(key)
    return {n for n in names if not n.endswith(("lm_head", "output_layer", "embed_out"))}


def _outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of adapter layers (their base layers and adapter tensors)."""
    inside: Optional[str] = None
    for key, module in model.named_modules():
        if inside is not None and key.startswith(inside):
            continue
        inside = None
        yield key, module
        if isinstance(module, AdapterLayer):
            inside = key + "." if key else ""


def find_targets(model: nn.Module, config: "PeftConfig") -> list[str]:
    """The keys of the modules ``config`` targets; raises TargetError listing close names if none."""
    all_linear = linear_module_names(model) if config.target_modules == "all-linear" else None
    keys = []
    for key, module in _outer_modules(model):
        if not key:
            continue
        if is_target(config, key, module, all_linear):
            keys.append(key)
    if not keys:
        raise TargetError(_no_match_message(model, config))
    return keys


def _no_match_message(model: nn.Module, config: "PeftConfig") -> str:
    targets = config.target_modules
    hints = closest_module_names(model, targets)
    leafs = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules() if k and not list(m.children())})
    msg = f"No module of the model matched target_modules={targets!r}"
    if getattr(config, "layers_to_transform", None) is not None:
        msg += f" with layers_to_transform={config.layers_to_transform!r}"
    msg += "."
    if hints:
        msg += f" Closest module names: {', '.join(hints)}."
    msg += f" Leaf module names in this model: {', '.join(leafs[:30])}{' ...' if len(leafs) > 30 else ''}."
    return msg


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_key, _, child = key.rpartition(".")
    return (model.get_submodule(parent_key) if parent_key else model), child


# ---------------------------------------------------------------------------------------------
# injection and unloading


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for key, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield key, module


def inject(model: nn.Module, config: "PeftConfig", adapter_name: str, *, targets: Optional[list[str]] = None) -> list[str]:
    """Wrap (or extend) every module ``config`` targets with an adapter ``adapter_name``.

    All-or-nothing: if creating any layer fails, every change made so far is undone before the
    error propagates. Returns the targeted keys.
    """
    from .methods import method_for

    method = method_for(config)
    if targets is not None:
        keys = targets
    elif method.find_targets is not None:  # methods that locate their targets themselves
        keys = method.find_targets(model, config)
    else:
        keys = find_targets(model, config)
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    extended: list[AdapterLayer] = []
    try:
        for key in keys:
            target = model.get_submodule(key)
            if isinstance(target, ModulesToSaveWrapper):
                raise TargetError(f"{key} is in modules_to_save of another adapter and cannot also be adapted.")
            if isinstance(target, AdapterLayer):
                if not isinstance(target, method.layer_types):
                    raise TargetError(
                        f"{key} already holds a {type(target).__name__} adapter; a {config.peft_type} adapter cannot be "
                        "added on the same module. Use a PeftMixedModel-free setup: one method per module."
                    )
                target.update_layer(adapter_name, config, key)
                extended.append(target)
                continue
            new = method.make_layer(target, config, adapter_name, key)
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, new)
            replaced.append((parent, child, target))
    except Exception:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        for parent, child, original in reversed(replaced):
            setattr(parent, child, original)
        raise
    return keys


def add_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Wrap every module whose key ends with one of ``names`` in a :class:`ModulesToSaveWrapper`."""
    found = []
    for key, module in list(_outer_modules(model)):
        if not key or isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
            continue
        if not any(key == n or key.endswith("." + n) for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update_layer(adapter_name)
        else:
            wrapper = ModulesToSaveWrapper(module)
            wrapper.update_layer(adapter_name)
            parent, child = get_submodule_parent(model, key)
            setattr(parent, child, wrapper)
        found.append(key)
    return found


def check_mergeable(layers: Iterable[tuple[str, nn.Module]]) -> None:
    """MergeError (before anything changes) if any of ``(key, layer)`` holds a non-mergeable adapter."""
    for key, layer in layers:
        if not isinstance(layer, ModulesToSaveWrapper) and not layer.mergeable:
            raise MergeError(f"{key}: {type(layer).__name__} adapters cannot be merged; use unload() instead."
                             f"{layer.merge_hint}")


def unload(model: nn.Module, *, merge: bool, safe_merge: bool = False,
           adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace every wrapper by its base module, merging the active (or given) adapters first."""
    layers = list(adapter_layers(model))
    if merge:
        check_mergeable(layers)
    for key, layer in layers:
        if isinstance(layer, ModulesToSaveWrapper):
            new = layer.unwrap(merge)
        else:
            if merge:
                layer.merge(adapter_names, safe_merge=safe_merge)
            elif layer.merged:
                layer.unmerge()
            new = layer.get_base_layer()
        parent, child = get_submodule_parent(model, key)
        setattr(parent, child, new)
    return model


def check_adapter_names(names: Sequence[str], known: Sequence[str]) -> None:
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise AdapterNameError(
            f"Unknown adapter name(s) {unknown}; loaded adapters: {list(known)} (use {BASE_ADAPTER!r} for the base model)."
        )
