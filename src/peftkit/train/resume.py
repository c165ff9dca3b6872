"""Resuming a run: the newest checkpoint that verifies, reads and fits, and the rule for settings.

The rule. ``--resume`` continues the run that wrote the checkpoint, exactly: a setting that changes
what is trained (model, method and its fields, data, lr, steps, batch, seed, precision, ...) must be
the same as in the run's ``run.yaml``; a different one is refused with the list of what changed,
before anything is written. Only settings that change how the run is watched or where it runs may
differ (:data:`RESUME_FREE`); ``run.yaml`` then records their new values. So ``run.yaml`` always
describes the run that produced the adapter.

Checkpoints are tried newest first. One that fails verification, or whose files cannot be read as
what they should hold (e.g. a pickle payload that ``weights_only=True`` refuses), is skipped with a
warning naming it, and the next older one is tried. One that reads fine but does not fit the model
and optimizer of this run (other targets, rank, method) is refused: no tensor is copied before every
shape has been checked.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

from ..errors import CheckpointError, PeftkitError, PeftkitWarning
from . import checkpoints as ckpt
from .trainable import expected_trainable, read_trainable

# settings that may change between a run and its resumption: they change how the run is watched or
# where it runs, not what it computes
RESUME_FREE = frozenset({
    ("train", "resume"), ("train", "progress"), ("train", "device"), ("train", "output_dir"),
    ("train", "logging_steps"), ("train", "eval_steps"), ("train", "save_steps"), ("train", "save_total_limit"),
    ("train", "num_generations"), ("train", "eval_generate_samples"), ("train", "max_new_tokens"),
    ("train", "micro_batch_size"), ("train", "gradient_checkpointing"),
    ("train", "compile"), ("train", "fused_lora"), ("train", "packed_attention"),  # the same math, another road
    ("train", "loss_head"), ("train", "last_block_at_targets"),  # the same loss and gradients, summed in another order
})
SECTIONS = ("model", "method_args", "data", "train")


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between two resolved run settings, as ``section.key: a -> b``."""
    refused, allowed = [], []
    for section in SECTIONS:
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                text = f"{'' if section == 'method_args' else section + '.'}{key}: {a.get(key)!r} -> {b.get(key)!r}"
                (allowed if (section, key) in RESUME_FREE else refused).append(text)
    return refused, allowed


def read_checkpoint(folder: str, model: Any, verified: bool = False) -> dict[str, Any]:
    """Everything a resume needs from ``folder``, read and type-checked but applied to nothing.
    CheckpointError if it does not verify or a file does not hold what it should."""
    data = ckpt.load_checkpoint(folder, verified=verified)
    data["adapter_tensors"] = read_trainable(model, data["adapter"])
    data["folder"] = folder
    return data


def newest_usable(checkpoints_dir: str, model: Any) -> Optional[dict[str, Any]]:
    """The newest checkpoint that verifies and reads (see :func:`read_checkpoint`); bad ones are
    skipped with a warning naming them. None if there is none."""
    for _, folder in ckpt.list_checkpoints(checkpoints_dir):
        problem = ckpt.verify(folder)
        if problem is None:
            try:
                return read_checkpoint(folder, model, verified=True)
            except CheckpointError as exc:
                problem = str(exc).rstrip(".")
        warnings.warn(f"Skipping checkpoint {folder}: {problem}; trying an older one.", PeftkitWarning, stacklevel=2)
    return None


def misfit(data: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer,
           expected_state: dict[str, Any]) -> Optional[str]:
    """What makes the checkpoint ``data`` unusable for this run's model and optimizer, or None."""
    state = data["state"]
    for key in ("batch_size", "seed", "total_steps"):
        if key in state and key in expected_state and state[key] != expected_state[key]:
            return f"it was written with {key}={state[key]} and this run has {key}={expected_state[key]}"
    want = {k: tuple(v) for k, v in expected_trainable(model).items()}
    have = {k: tuple(v.shape) for k, v in data["adapter_tensors"].items()}
    if set(want) != set(have):
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        parts = []
        if missing:
            parts.append(f"{len(missing)} adapter tensors of this run are not in it (e.g. {missing[0]})")
        if extra:
            parts.append(f"it holds {len(extra)} adapter tensors this run does not have (e.g. {extra[0]})")
        return "; ".join(parts) + " (other target modules or method?)"
    for key in sorted(want):
        if want[key] != have[key]:
            return f"adapter tensor {key} has shape {list(have[key])} in it and {list(want[key])} in this run " \
                   "(another rank or size?)"
    return _optimizer_misfit(data["optimizer"], optimizer)


def _optimizer_misfit(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> Optional[str]:
    groups = optimizer.param_groups
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(groups) or any(len(a["params"]) != len(b["params"])
                                               for a, b in zip(saved_groups, groups)):
        return (f"its optimizer holds {sum(len(g['params']) for g in saved_groups)} parameters and this run trains "
                f"{sum(len(g['params']) for g in groups)}")
    params = [p for g in groups for p in g["params"]]
    ids = [i for g in saved_groups for i in g["params"]]
    for pid, param in zip(ids, params):
        for name, value in (saved["state"].get(pid) or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                return (f"its optimizer state {name!r} of parameter {pid} has shape {list(value.shape)}, the "
                        f"parameter {list(param.shape)}")
    return None


def check_fits(data: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer,
               expected_state: dict[str, Any]) -> None:
    problem = misfit(data, model, optimizer, expected_state)
    if problem is not None:
        raise CheckpointError(f"Checkpoint {data['folder']} does not fit this run: {problem}. Resume with the "
                              "settings of the run that wrote it (its run.yaml), or start a new run with another "
                              "--output-dir.")


def check_resume_settings(run_file: str, resolved: dict[str, Any], load_yaml: Any) -> list[str]:
    """Refuse (PeftkitError) settings that differ from the run's ``run.yaml`` in what is trained; the
    allowed changes, for a note. No run.yaml (a run of an older peftkit): nothing to compare."""
    if not os.path.isfile(run_file):
        return []
    old = load_yaml(run_file)
    refused, allowed = setting_changes(old, resolved)
    if refused:
        raise PeftkitError(f"--resume continues the run in {os.path.dirname(run_file) or '.'} exactly, and these "
                           f"settings differ from its run.yaml: {'; '.join(refused)}. Resume with the run's "
                           "settings (e.g. --config <its run.yaml> --resume), or start a new run with another "
                           "--output-dir.")
    return allowed


__all__ = ["RESUME_FREE", "check_fits", "check_resume_settings", "misfit", "newest_usable", "read_checkpoint",
           "setting_changes"]
