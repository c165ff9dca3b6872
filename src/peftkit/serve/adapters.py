"""Which adapters the server knows, which are installed, and loading them off the request path.

An adapter is *registered* (a name and a folder: from ``--adapter``, ``--adapter-dir`` or
``POST /v1/load_lora_adapter``) and, while requests use it, *installed* in the model. At most
``max_adapters`` are installed; installing one more evicts the least recently used adapter that no
waiting or running request needs (it stays registered and is installed again on its next request).

Reading a folder (files, checks, tensors) runs on a loader thread, so a request for an adapter that is
not installed waits without stalling anyone; the engine thread then installs what was read between two
forward passes (:meth:`AdapterStore.apply`), the only place the model changes.

Folders named by clients must lie inside the allowed roots (``--adapter-dir``), checked after resolving
symbolic links and ``..``: no path a client sends reaches the file system unchecked.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from ..adapter_io import read_adapter
from ..errors import PeftkitError
from .errors import ServeError
from .host import AdapterHost

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass
class Adapter:
    """A registered adapter and where it is in its life (``registered`` -> ``reading`` -> ``read`` ->
    ``installed``; ``failed`` with ``error``)."""

    name: str
    path: str
    method: str
    state: str = "registered"
    error: Optional[str] = None
    data: Any = None  # (source, config, weights) once read
    last_used: float = 0.0
    waiters: list[Future] = field(default_factory=list)  # runtime loads waiting for the install


def adapter_method(path: str) -> str:
    """The ``peft_type`` in ``path``'s adapter_config.json (ServeError if it cannot be read)."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        return str(config["peft_type"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServeError(f"{path} is not an adapter folder (adapter_config.json: {type(exc).__name__}: {exc}).",
                         status=400, code="adapter_not_found") from None


def scan_folder(root: str) -> list[tuple[str, str]]:
    """(name, folder) of every adapter folder directly in ``root`` or one level down (``runs/x/adapter``
    is named ``x``); links that lead out of ``root`` are skipped."""
    found = []
    real_root = os.path.realpath(root)
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
            continue
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            found.append((entry, path))
        elif os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")):
            found.append((entry, os.path.join(path, "adapter")))
    return found


class AdapterStore:
    """The registered adapters, the installed ones (LRU, at most ``max_adapters``) and the loader thread."""

    def __init__(self, roots: Iterable[str], max_adapters: int, wake: Callable[[], None],
                 on_event: Callable[[str, str], None] = lambda kind, name: None):
        if max_adapters < 1:
            raise PeftkitError("--max-adapters must be at least 1.")
        self.roots = [os.path.realpath(r) for r in roots]
        self.max_adapters = max_adapters
        self.adapters: dict[str, Adapter] = {}
        self.removals: dict[str, Future] = {}  # unregistered while installed: removed when no row uses them
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._wake = wake
        self._on_event = on_event
        self._thread = threading.Thread(target=self._read_loop, name="peftkit-adapter-loader", daemon=True)
        self._thread.start()

    # -- registry (any thread) -------------------------------------------------------------------
    def allowed_path(self, path: str) -> str:
        """``path`` resolved (relative paths against the first root) if it lies inside an allowed root."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ServeError("lora_path must be a folder path.", param="lora_path")
        if not self.roots:
            raise ServeError("This server loads no adapters at run time (start it with --adapter-dir).",
                             status=403, code="forbidden")
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(self.roots[0], path))
        if not any(os.path.commonpath([full, r]) == r for r in self.roots):
            raise ServeError("lora_path is outside the folders this server may load adapters from.",
                             status=403, code="forbidden", param="lora_path")
        if not os.path.isdir(full):
            raise ServeError(f"No adapter folder at {path!r}.", status=404, code="adapter_not_found",
                             param="lora_path")
        return full

    def register(self, name: str, path: str) -> Adapter:
        """Add adapter ``name`` at folder ``path`` (already checked); ServeError if the name is taken."""
        if not isinstance(name, str) or not NAME_RE.match(name) or name == "__base__":
            raise ServeError("Adapter names are 1-128 letters, digits and ._:/- (starting with a letter or "
                             "digit).", param="lora_name")
        method = adapter_method(path)
        with self._lock:
            if name in self.adapters or name in self.removals:
                raise ServeError(f"An adapter named {name!r} is already loaded.", status=409,
                                 code="adapter_exists", param="lora_name")
            adapter = self.adapters[name] = Adapter(name, path, method)
        return adapter

    def unregister(self, name: str) -> Future:
        """Forget ``name``; the future completes when it is out of the model (at once if not installed)."""
        done: Future = Future()
        with self._lock:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise ServeError(f"No adapter named {name!r} is loaded.", status=404, code="adapter_not_found",
                                 param="lora_name")
            for waiter in adapter.waiters:
                waiter.set_exception(ServeError(f"Adapter {name!r} was unloaded.", status=409))
            if adapter.state == "installed":
                self.removals[name] = done
            else:
                done.set_result(None)
        self._wake()
        return done

    def get(self, name: str) -> Optional[Adapter]:
        return self.adapters.get(name)

    def names(self) -> list[str]:
        return list(self.adapters)

    def request_install(self, name: str, waiter: Optional[Future] = None) -> None:
        """Make sure ``name`` is (being) installed; ``waiter`` completes when it is."""
        with self._lock:
            adapter = self.adapters[name]
            if adapter.state == "installed":
                if waiter is not None:
                    waiter.set_result(None)
                return
            if waiter is not None:
                adapter.waiters.append(waiter)
            if adapter.state in ("registered", "failed"):
                adapter.state, adapter.error = "reading", None
                self._queue.put(name)

    # -- loader thread ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            name = self._queue.get()
            if name is None:
                return
            adapter = self.adapters.get(name)
            if adapter is None or adapter.state != "reading":
                continue
            try:
                data = read_adapter(adapter.path, None, None, False, None, {})
            except Exception as exc:  # a bad folder fails its requests, never the server
                self._fail(adapter, f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                if adapter.state == "reading":
                    adapter.data, adapter.state = data, "read"
            self._wake()

    def _fail(self, adapter: Adapter, message: str) -> None:
        with self._lock:
            adapter.state, adapter.error, adapter.data = "failed", message, None
            waiters, adapter.waiters = adapter.waiters, []
        for waiter in waiters:
            waiter.set_exception(ServeError(f"Adapter {adapter.name!r} could not be loaded: {message}",
                                            status=400, code="adapter_load_failed"))
        self._on_event("failed", adapter.name)
        self._wake()

    def close(self) -> None:
        self._queue.put(None)

    # -- engine thread ---------------------------------------------------------------------------
    def apply(self, host: AdapterHost, in_use: set[str]) -> None:
        """Install what was read and remove what was unloaded (evicting unused adapters beyond the limit)."""
        for name, done in list(self.removals.items()):
            if name not in in_use:
                host.remove(name)
                del self.removals[name]
                self._on_event("unloaded", name)
                done.set_result(None)
        for adapter in [a for a in list(self.adapters.values()) if a.state == "read"]:
            if not self._make_room(host, in_use | {adapter.name}):
                return  # every installed adapter is in use: try again after the next step
            source, config, weights = adapter.data
            try:
                host.install(adapter.name, config, weights, source)
            except Exception as exc:
                self._fail(adapter, f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                adapter.state, adapter.data, adapter.last_used = "installed", None, time.monotonic()
                waiters, adapter.waiters = adapter.waiters, []
            self._on_event("loaded", adapter.name)
            for waiter in waiters:
                waiter.set_result(None)

    def _make_room(self, host: AdapterHost, in_use: set[str]) -> bool:
        while len(host.installed()) >= self.max_adapters:
            idle = [a for a in self.adapters.values() if a.state == "installed" and a.name not in in_use]
            if not idle:
                return False
            victim = min(idle, key=lambda a: a.last_used)
            host.remove(victim.name)
            victim.state = "registered"
            self._on_event("evicted", victim.name)
        return True

    def touch(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is not None:
            adapter.last_used = time.monotonic()

    def installed(self, name: str) -> bool:
        adapter = self.adapters.get(name)
        return adapter is not None and adapter.state == "installed"


__all__ = ["Adapter", "AdapterStore", "NAME_RE", "adapter_method", "scan_folder"]
