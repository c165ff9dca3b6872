"""Files: atomic writes with fsync, safetensors read/write, single-tensor reads. A leaf module.

Every file peftkit writes (adapter folders, configs, training checkpoints, quantized models, run
files) goes through :func:`atomic_write_bytes`: the bytes go to a temporary file in the same folder,
which is fsynced and renamed over the target, and the folder is fsynced, so a reader sees the old
file or the whole new one, never a part. Reading never executes code: safetensors, or a legacy
``.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import tempfile
from typing import Optional

import torch

from .errors import CheckpointError, PeftkitError


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux: /proc), else
    with the classic set-and-restore (``os.umask`` has no getter)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder under the current umask (0o755 under umask 022)."""
    return 0o777 & ~current_umask()


def set_mode(path: str, mode: int) -> None:
    """``os.chmod`` where the file system supports it (a FAT or some network mounts refuse: keep theirs)."""
    try:
        os.chmod(path, mode)
    except OSError:  # pragma: no cover - file systems without POSIX modes
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part.

    The file gets the permissions a plain ``open(path, "w")`` would: those of the file it replaces,
    else the umask's; not the 0600 of the temporary file it is written as."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = file_mode()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        set_mode(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies (shared storage cloned, as both formats require)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[dict] = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, shared storage cloned)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(_cpu_copies(tensors), metadata={"format": "pt", **(metadata or {})}))


def save_tensors_pickle(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write a legacy ``torch.save`` file (``safe_serialization=False``)."""
    buf = io.BytesIO()
    torch.save(_cpu_copies(tensors), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: str | os.PathLike, device: Optional[str | torch.device] = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a legacy ``.bin`` with ``weights_only=True``; CheckpointError if corrupt."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device=str(device or "cpu"))
        out = torch.load(path, map_location=device or "cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Missing weights file {path}.") from None
    except Exception as exc:  # safetensors and pickle errors have no common base class
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors.")
    return out


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 KB"``, ... (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_output_folder(path: str | os.PathLike, what: str = "--output-dir",
                        error: type[PeftkitError] = PeftkitError) -> None:
    """``error`` if ``path`` cannot become a folder: it is a file, or lies under one."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{what} {path} is a file; choose a folder.")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise error(f"{what} {path} lies under the file {parent}; choose a folder.")


def make_folder(path: str | os.PathLike) -> None:
    """``os.makedirs(path, exist_ok=True)``, or a CheckpointError saying why it cannot be (the path is a
    file, one of its parents is, no permission, ...)."""
    if os.path.isfile(path):
        raise CheckpointError(f"{os.fspath(path)} is a file; pass a directory to save into.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"Cannot create the folder {os.fspath(path)}: {exc.strerror or exc}. Pass a directory "
                              "path whose parents are directories you can write to.") from None


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads single tensors from a safetensors file with plain file reads (no mmap), so that only
    the tensors asked for ever occupy process memory. ``entries[key] = (dtype, shape, start, end)``.
    The header is checked on opening (corrupt or truncated: CheckpointError). Never executes code."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb")
            size = os.fstat(self._fh.fileno()).st_size
            n = int.from_bytes(self._fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(self._fh.read(n))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has an unsupported or corrupt header entry.") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - start != nbytes or self._base + end > size:
                raise CheckpointError(f"{path}: tensor {key!r} is truncated or its offsets are corrupt.")
            self.entries[key] = (dtype, shape, start, end)

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[key]
        out = torch.empty(shape, dtype=dtype)
        if end > start:
            self._fh.seek(self._base + start)
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if self._fh.readinto(view) != end - start:
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated.")
        return out

    def close(self) -> None:
        self._fh.close()


__all__ = ["SafetensorsReader", "atomic_write_bytes", "current_umask", "dir_mode", "file_mode", "fsync_dir",
           "load_tensors", "save_tensors", "save_tensors_pickle", "set_mode"]
