"""Resumable training checkpoints, written atomically and verified before use.

Layout of ``<output_dir>/checkpoints/step-N/``::

    adapter/              the adapter folder (save_pretrained), loadable on its own
    optimizer.pt          AdamW state   (torch.save; read back with weights_only=True)
    scheduler.pt          LR scheduler state
    rng.pt                RNG states of every process (torch, CUDA, Python, NumPy)
    trainer_state.json    step, epoch, data position, early-stopping state, counters
    COMPLETE.json         written last: the SHA-256 and size of every file above

A checkpoint is built in a hidden ``.tmp-step-N-*`` folder (each file fsynced) and renamed to
``step-N`` only when whole (a directory rename is atomic). A reader takes the newest ``step-N`` whose
``COMPLETE.json`` exists and whose files all match their recorded hashes; a folder cut short by a
crash (kill -9, power loss) or changed afterwards is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Optional

import torch

from .._io import atomic_write_bytes, dir_mode, fsync_dir, set_mode
from ..errors import CheckpointError, PeftkitWarning

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_checkpoint(checkpoints_dir: str, step: int, *, save_adapter: Any, optimizer: dict, scheduler: dict,
                     rng: list[dict], state: dict[str, Any]) -> str:
    """Write ``checkpoints_dir/step-<step>`` atomically; ``save_adapter(folder)`` writes the adapter."""
    os.makedirs(checkpoints_dir, exist_ok=True)
    final = os.path.join(checkpoints_dir, f"step-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=checkpoints_dir)
    try:
        set_mode(tmp, dir_mode())  # mkdtemp makes 0700; a checkpoint folder gets the umask's mode
        save_adapter(os.path.join(tmp, "adapter"))
        atomic_write_bytes(os.path.join(tmp, "optimizer.pt"), torch_bytes(optimizer))
        atomic_write_bytes(os.path.join(tmp, "scheduler.pt"), torch_bytes(scheduler))
        atomic_write_bytes(os.path.join(tmp, "rng.pt"), torch_bytes(rng))
        atomic_write_bytes(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=2).encode())
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                fsync_dir(os.path.join(root, d))
        manifest = {"step": step, "files": {rel: {"sha256": _sha256(os.path.join(tmp, rel)),
                                                  "bytes": os.path.getsize(os.path.join(tmp, rel))}
                                            for rel in _files(tmp)}}
        atomic_write_bytes(os.path.join(tmp, MARKER), json.dumps(manifest, indent=2).encode())
        if os.path.exists(final):  # a stale checkpoint of this step (after resuming from an older one)
            trash = tempfile.mkdtemp(prefix=f".trash-step-{step}-", dir=checkpoints_dir)
            os.rename(final, os.path.join(trash, "old"))
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(folder: str) -> Optional[str]:
    """None if ``folder`` is a complete, unchanged checkpoint, else what is wrong with it."""
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        return f"no {MARKER} (the checkpoint was not finished)"
    try:
        with open(marker, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    for rel, meta in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != meta.get("bytes"):
            return f"{rel} has the wrong size (truncated?)"
        if _sha256(path) != meta.get("sha256"):
            return f"{rel} does not match its recorded SHA-256 (corrupt)"
    if not {"optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= set(files):
        return "files are missing from the manifest"
    return None


def list_checkpoints(checkpoints_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every ``step-N`` folder, newest first (complete or not)."""
    if not os.path.isdir(checkpoints_dir):
        return []
    out = []
    for name in os.listdir(checkpoints_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(checkpoints_dir, name)):
            out.append((int(m.group(1)), os.path.join(checkpoints_dir, name)))
    return sorted(out, reverse=True)


def latest_checkpoint(checkpoints_dir: str) -> Optional[str]:
    """The newest complete and valid checkpoint folder, or None; bad ones are skipped with a warning."""
    for _, folder in list_checkpoints(checkpoints_dir):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"Skipping checkpoint {folder}: {problem}.", PeftkitWarning, stacklevel=2)
    return None


def load_checkpoint(folder: str, verified: bool = False) -> dict[str, Any]:
    """The optimizer, scheduler, RNG and trainer states of a verified checkpoint (no code is run).
    ``verified``: the caller has just run :func:`verify` on it (e.g. through latest_checkpoint).

    CheckpointError if it does not verify, or if a file does not hold what it should: a pickle with
    anything but tensors and plain containers (``weights_only=True`` refuses to build it), or a value
    of the wrong kind."""
    problem = None if verified else verify(folder)
    if problem is not None:
        raise CheckpointError(f"Checkpoint {folder} cannot be used: {problem}.")

    def load(name: str, kind: type) -> Any:
        path = os.path.join(folder, name)
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not our file"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"{path} cannot be read safely ({type(exc).__name__}: {first[:200]})") from None
        if not isinstance(value, kind):
            raise CheckpointError(f"{path} holds a {type(value).__name__}, not a {kind.__name__}")
        return value

    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/trainer_state.json cannot be read ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{folder}/trainer_state.json holds no step")
    optimizer = load("optimizer.pt", dict)
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"]):
        raise CheckpointError(f"{folder}/optimizer.pt is not an optimizer state (state, param_groups)")
    rng = load("rng.pt", list)
    if not all(isinstance(r, dict) for r in rng):
        raise CheckpointError(f"{folder}/rng.pt is not a list of RNG states")
    return {"optimizer": optimizer, "scheduler": load("scheduler.pt", dict), "rng": rng,
            "state": state, "adapter": os.path.join(folder, "adapter")}


def prune(checkpoints_dir: str, keep: int, protect: Optional[str] = None) -> None:
    """Keep the newest ``keep`` checkpoints that verify (and ``protect``, the one just written, always);
    delete every checkpoint older than the oldest kept one, and leftovers of interrupted writes.

    Checkpoints are verified newest first, so a corrupt or unfinished folder never counts toward
    ``keep`` and never pushes a good one out; one newer than the kept ones is left where it is (a
    resumed run overwrites it when it reaches that step) and is skipped by :func:`latest_checkpoint`.
    """
    if not os.path.isdir(checkpoints_dir):
        return
    for name in os.listdir(checkpoints_dir):
        if name.startswith((".tmp-step-", ".trash-step-")):
            shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)
    protect = os.path.abspath(protect) if protect else None
    kept = 0
    doomed = []
    for _, folder in list_checkpoints(checkpoints_dir):
        if kept >= max(keep, 1):
            if os.path.abspath(folder) != protect:
                doomed.append(folder)
        elif verify(folder) is None:
            kept += 1
    for folder in doomed:
        # rename first, so that a crash mid-delete never leaves a step-N that looks complete
        trash = os.path.join(checkpoints_dir, ".trash-" + os.path.basename(folder) + f"-{os.getpid()}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG state a training step can consume, as tensors and lists (weights_only-loadable)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


__all__ = ["latest_checkpoint", "list_checkpoints", "load_checkpoint", "prune", "rng_state", "set_rng_state",
           "verify", "write_checkpoint"]
