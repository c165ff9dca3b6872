"""One run per output folder at a time: an exclusive lock on ``<output_dir>/.peftkit-lock``.

Where the platform has ``fcntl.flock`` the lock is the kernel's: it is released when the process
ends, however it ends (``kill -9`` included), so a lock file left behind by a dead run is simply taken
over. Elsewhere (or on a file system without ``flock``) the file itself is the lock, created with
``O_EXCL``; one whose process is gone (same host, no such pid) is stale and removed. Either way the
file holds the holder's pid, host and start time, and a second run into the folder fails at once
with a :class:`RunLockedError` that names them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any, Optional

from .._io import check_output_folder
from ..errors import PeftkitError

LOCK_NAME = ".peftkit-lock"


class RunLockedError(PeftkitError):
    """Another live process is writing a run into the same output folder."""


def _holder_text(info: dict[str, Any], folder: str) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"{folder} is in use by another peftkit run (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"started {when}); wait for it to finish or stop it, or choose another --output-dir.")


def _read_info(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    except OSError:
        return True
    return True


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock; the folder is created if needed and, if it
    was created here and is still empty when the lock is released, removed again."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None
        self._created_folder = False
        self._flock = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _info_bytes(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()

    def acquire(self) -> None:
        check_output_folder(self.folder)
        if not os.path.isdir(self.folder):
            try:
                os.makedirs(self.folder)
                self._created_folder = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise PeftkitError(f"Cannot create the output folder {self.folder}: {exc.strerror}.") from None
        try:
            if not self._try_flock():
                self._exclusive_create()
        except OSError as exc:
            self._remove_created_folder()
            raise PeftkitError(f"Cannot write into the output folder {self.folder} ({exc.strerror}); check its "
                               "permissions or choose another --output-dir.") from None
        except PeftkitError:
            self._remove_created_folder()
            raise

    def _try_flock(self) -> bool:
        """Take the lock with flock; False where flock is unavailable (use the O_EXCL file instead)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockedError(_holder_text(_read_info(self.path), self.folder)) from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return False
                raise
            try:  # the holder before us may have removed the file between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, self._info_bytes())
        os.fsync(fd)
        self._fd, self._flock = fd, True
        return True

    def _exclusive_create(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                info = _read_info(self.path)
                if info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
                    try:  # stale: its process is gone
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise RunLockedError(_holder_text(info, self.folder)) from None
            os.write(fd, self._info_bytes())
            os.fsync(fd)
            self._fd = fd
            return
        raise RunLockedError(_holder_text(_read_info(self.path), self.folder))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        if self._created_folder:
            try:
                os.rmdir(self.folder)  # only if empty: nothing of the run was written
            except OSError:
                pass
            self._created_folder = False


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]
