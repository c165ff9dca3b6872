"""Three choices of a training run that trade time and memory, each decided per run and stated in its
report: ``torch.compile`` of the decoder blocks, activation checkpointing per block, and LoRA's fused
training road (:mod:`peftkit.methods.lora.fused`).

Compile. :func:`choose_compile` finds the model's repeated blocks (the longest ``nn.ModuleList`` of
modules of one class: transformers' ``layers`` / ``h`` / ``block``) and :func:`apply_compile`
compiles each in place (``module.compile()``: parameter names, state dicts and adapter files are
unchanged, and DDP, the chunked loss head and checkpointing wrap them as before). The blocks share
their code, so one compiled graph serves them all. Shapes: a micro-batch is (rows, width) with width
the longest row in it; torch compiles the first width statically and, on the first other width,
once more with a dynamic sequence length (torch's automatic dynamic shapes), so packed and padded
batches alike cost two compilations at most. The mask, the embeddings, the head and the loss stay
eager, and so do evaluation and generation (:func:`eager_stance`); the trainer restores the eager
blocks when training ends (:func:`remove_compile`). ``"auto"`` compiles where it was measured faster on this kind of machine (see
:data:`COMPILE_AUTO_DEVICES`); ``"on"`` asks for it anywhere.

Checkpointing. :func:`activation_bytes_per_token` measures what the training forward keeps for the
backward pass (saved tensors, the parameters excepted) on a short probe row; :func:`choose_checkpointing`
multiplies it by the tokens of a micro-batch and turns checkpointing on when that exceeds
:data:`CHECKPOINT_SHARE` of the memory available (``torch.cuda.mem_get_info`` on a GPU,
``MemAvailable`` of ``/proc/meminfo`` or psutil on a CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .._io import human_bytes
from ..errors import ConfigError
from .config import TrainConfig
from .trainable import in_mode

COMPILE_MODES = ("auto", "on", "off")
# device types where "auto" compiles: measured faster and exact there (docs/benchmarks.md)
COMPILE_AUTO_DEVICES: tuple[str, ...] = ()
# tokens of the probe row the activations are measured on (its first ones): per token, the saved tensors of a
# block do not depend on the length (attention saves O(length) with SDPA); a short probe keeps the probe's own
# memory (which the allocator may keep after it is freed) far below a training step's
PROBE_TOKENS = 64
# checkpointing turns on when the activations of a micro-batch would take more than this share of the free memory
CHECKPOINT_SHARE = 0.5


@dataclass
class CompilePlan:
    """Whether the run compiles its blocks, and why."""

    enabled: bool
    reason: str
    blocks: int = 0

    def describe(self) -> str:
        """One line for the run's report."""
        if self.enabled:
            return f"torch.compile of the {self.blocks} decoder blocks ({self.reason})"
        return f"eager ({self.reason})"


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the longest ``nn.ModuleList`` whose members are all of one class
    (at least two of them); [] if there is none."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def choose_compile(model: nn.Module, mode: str, device: torch.device) -> CompilePlan:
    """The compile plan of ``model`` for ``mode``. ``"on"`` where there are no blocks raises ConfigError."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}.")
    if mode == "off":
        return CompilePlan(False, "compile off")
    blocks = decoder_blocks(model)
    if not blocks:
        if mode == "on":
            raise ConfigError("--compile on: the model has no repeated blocks (an nn.ModuleList of one layer "
                              "class) to compile; use --compile auto or off.")
        return CompilePlan(False, "no repeated blocks to compile")
    if mode == "auto" and device.type not in COMPILE_AUTO_DEVICES:
        return CompilePlan(False, f"compile auto: not measured faster on {device.type}; --compile on asks for it")
    return CompilePlan(True, "asked for" if mode == "on" else f"compile auto on {device.type}", len(blocks))


def apply_compile(model: nn.Module, plan: CompilePlan) -> None:
    """Compile each block of ``model`` in place when ``plan`` says so (once: a compiled block is kept)."""
    if not plan.enabled:
        return
    for block in decoder_blocks(model):
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=None)


def eager_stance(plan: CompilePlan) -> contextlib.AbstractContextManager:
    """Inside, compiled blocks run eagerly: evaluation and generation (no gradient, other shapes, a KV
    cache) would otherwise compile anew for little gain."""
    return torch.compiler.set_stance("force_eager") if plan.enabled else contextlib.nullcontext()


def remove_compile(model: nn.Module, plan: CompilePlan) -> None:
    """Undo :func:`apply_compile`: the blocks of ``model`` run their eager forward again."""
    if plan.enabled:
        for block in decoder_blocks(model):
            block._compiled_call_impl = None


# ---------------------------------------------------------------------------------------------
# activation checkpointing


@dataclass
class CheckpointPlan:
    """Whether the run checkpoints activations per block, and why (the estimate it was chosen by)."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        """One line for the run's report."""
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for this run on ``device``: free GPU memory, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def activation_bytes_per_token(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], model: nn.Module,
                               batch: dict[str, torch.Tensor]) -> float:
    """Bytes the training forward ``forward(batch)`` saves for backward, per input token of ``batch``.

    Counted with ``saved_tensors_hooks``: each saved tensor's storage once, the model's parameters
    and buffers not (they exist anyway). The RNG states are restored afterwards (dropout draws in
    the probe must not shift the run's), and no gradient is computed.
    """
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    devices = [batch["input_ids"].device.index] if batch["input_ids"].is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(batch)
        del loss
    tokens = int(batch["input_ids"].numel())
    return sum(seen.values()) / max(tokens, 1)


def choose_checkpointing(setting: Optional[bool], estimate: Callable[[], float], tokens: int,
                         device: torch.device, can_checkpoint: bool) -> CheckpointPlan:
    """On or off for ``setting`` (True / False: as asked; None: by the memory estimate).

    ``estimate()`` gives the activation bytes per token (called only for the estimate);
    ``tokens`` is the number of tokens of the largest micro-batch.
    """
    if setting is not None:
        return CheckpointPlan(setting, "asked for" if setting else "turned off")
    if not can_checkpoint:
        return CheckpointPlan(False, "the model has no activation_checkpointing_enable()")
    free = available_memory(device)
    if free is None:
        return CheckpointPlan(False, f"the free memory of {device.type} is unknown")
    need = estimate() * tokens
    share = need / max(free, 1)
    text = (f"activations ~{human_bytes(int(need))} a micro-batch of {tokens:,} tokens, {100 * share:.0f}% of the "
            f"{human_bytes(free)} available; on above {100 * CHECKPOINT_SHARE:.0f}%")
    return CheckpointPlan(share > CHECKPOINT_SHARE, text)


def checkpointing_switch(model: nn.Module) -> Optional[Callable[[], None]]:
    """A call that turns on transformers' per-block checkpointing of ``model`` (non-reentrant), through
    ``activation_checkpointing_enable`` or its older name; None if the model has neither."""
    for name, kwarg in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                        ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, name, None)
        if callable(enable):
            return lambda: enable(**{kwarg: {"use_reentrant": False}})
    return None


def enable_checkpointing(model: nn.Module) -> bool:
    """Turn on transformers' per-block checkpointing of ``model`` (non-reentrant); False if it has none."""
    enable = checkpointing_switch(model)
    if enable is None:
        return False
    enable()
    return True


def plan_fused_lora(model: nn.Module, enabled: bool) -> str:
    """Turn LoRA's fused training road (:mod:`peftkit.methods.lora.fused`) on or off in ``model``; the
    report line: how many LoRA linear layers fuse and, for the others, why not."""
    from ..methods.lora import set_fused_training

    counts = set_fused_training(model, enabled)
    if not counts:
        return "no LoRA linear layers"
    if not enabled:
        return f"off (fused_lora false): {counts.get('fusing off', 0)} LoRA linear layers on the general path"
    fused = counts.pop("fused", 0)
    others = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
    tail = f"; general path: {others}" if others else ""
    return f"{fused} LoRA linear layers fused (one autograd node: base + adapter){tail}; not under autocast"


def plan_speed(model: nn.Module, loss_forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
               probe: dict[str, torch.Tensor], tokens: int, config: TrainConfig, device: torch.device,
               prompt_learning: bool = False) -> tuple[CheckpointPlan, CompilePlan, str]:
    """A run's checkpointing (``config.gradient_checkpointing``; None: by the activations of ``loss_forward``
    on the first PROBE_TOKENS of the ``probe`` row, in training mode, times the ``tokens`` of the largest
    micro-batch) and its
    compile plan (``config.compile``), both applied to ``model``, and the fused LoRA road's report line
    (``config.fused_lora``). ``prompt_learning``: the model prepends virtual tokens or key/value prefixes,
    which checkpointing may not support (it is then never chosen by the estimate, only when asked for)."""

    def estimate() -> float:
        batch = {k: (v[:, :PROBE_TOKENS] if v.dim() == 2 else v).to(device) for k, v in probe.items()}
        with in_mode(model, True):
            return activation_bytes_per_token(loss_forward, model, batch)

    if prompt_learning and config.gradient_checkpointing is None:
        checkpointing = CheckpointPlan(False, "not chosen for prompt-learning methods; --gradient-checkpointing asks")
    else:
        checkpointing = choose_checkpointing(config.gradient_checkpointing, estimate, tokens, device,
                                             checkpointing_switch(model) is not None)
    if checkpointing.enabled and config.gradient_checkpointing is None:
        enable_checkpointing(model)
    fused = plan_fused_lora(model, config.fused_lora)
    compiling = choose_compile(model, config.compile, device)
    apply_compile(model, compiling)
    cut = getattr(getattr(loss_forward, "plan", None), "last_block", None)  # see .last_block: eager blocks only
    if cut is not None and (checkpointing.enabled or compiling.enabled):
        cut.drop("activation checkpointing recomputes" if checkpointing.enabled else "compiled blocks run")
    return checkpointing, compiling, fused


__all__ = ["CHECKPOINT_SHARE", "PROBE_TOKENS", "COMPILE_AUTO_DEVICES", "COMPILE_MODES", "CheckpointPlan", "CompilePlan",
           "activation_bytes_per_token", "apply_compile", "available_memory", "checkpointing_switch",
           "choose_checkpointing", "choose_compile", "decoder_blocks", "eager_stance", "enable_checkpointing", "plan_fused_lora",
           "plan_speed", "remove_compile"]
