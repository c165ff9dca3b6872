"""``peftkit serve``: one base model, many adapters of every kind, one continuously batched
OpenAI-compatible server (see docs/serving.md).

host.py (the model and its installed adapters) -> batch.py (the running batch's per-row cache) ->
engine.py (the scheduler thread) -> adapters.py (registry, LRU, loader thread) -> server.py (options,
keys, checks) -> app.py (the HTTP routes); protocol.py, text.py, metrics.py, errors.py serve them.
"""

from .engine import Engine, Event, Request, SamplingParams
from .errors import ServeError
from .host import AdapterHost
from .server import ServeOptions, Server

__all__ = ["AdapterHost", "Engine", "Event", "Request", "SamplingParams", "ServeError", "ServeOptions", "Server"]
