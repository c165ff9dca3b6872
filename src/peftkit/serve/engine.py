"""The continuously batched generation engine: one thread, one base model, rows of any adapter.

Each iteration of the engine thread's loop:

1. installs adapters the loader thread has read and removes unloaded ones (never one in use);
2. drops cancelled or timed-out requests;
3. admits waiting requests whose adapter is installed (first come first served, up to ``max_batch``
   rows and ``max_prefill_tokens`` prompt tokens; a request waiting for its adapter does not hold up the
   ones behind it) and prefills them in batched forwards (rows of similar length together, ordered by
   adapter; on a CPU, forwards of at most :data:`PREFILL_TOKENS` padded tokens; the longest first, so
   that the others join the cache in place): soft prompts laid into the rows, layer adapters routed per
   row (:mod:`peftkit.serve.batch`);
4. runs one decode step of every running row, newcomers included, in one forward; rows that finish
   leave the batch at once and their slots go to the next waiting requests.

A request with ``n`` choices is ``n`` rows. Tokens are picked per row (greedy, or temperature / top-p
sampling with the row's own seeded generator, so a seeded request gives the same text whatever runs
beside it). The text is released through :class:`~peftkit.serve.text.TextStream` (stop strings), and
every token, and the end of each row, reaches the request's ``deliver`` callback on the engine thread.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core.mixed import mixed_batch
from ..prompt.introspect import accepts
from .adapters import AdapterStore
from .batch import RunningBatch, build_prefill, use_decode_attention
from .errors import ServeError
from .host import AdapterHost
from .text import TextStream

# padded prompt tokens a prefill forward takes at most on a CPU: the 256-prompt prefill of
# bench/serve_decode_step.py's model took 2.1-2.5 s in forwards of 640-2,560 tokens, 3.2-3.8 s in one
PREFILL_TOKENS = 2048


@dataclass
class SamplingParams:
    """How a request's tokens are chosen and when its rows stop. ``temperature`` 0: greedy. ``logprobs``:
    report each token's log-probability and that many alternatives (None: none)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None
    ignore_eos: bool = False


@dataclass
class Event:
    """What a request hears: ``token`` (``text`` released with it, maybe ""), ``done`` (``finish_reason``:
    stop / length), or ``error`` (``error``: a ServeError)."""

    kind: str
    index: int = 0
    text: str = ""
    token: Optional[int] = None
    logprob: Optional[float] = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[ServeError] = None


class Request:
    """A generation request: ``n`` rows of ``prompt_ids`` through adapter ``adapter`` (or the base)."""

    _ids = itertools.count()

    def __init__(self, adapter: str, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[Event], None],
                 n: int = 1, timeout: float = 600.0):
        self.id = next(self._ids)
        self.adapter, self.prompt_ids, self.params, self.n = adapter, list(prompt_ids), params, n
        self.deliver = deliver
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.first_token_at: Optional[float] = None
        self.generated = 0
        self.cancelled = False
        self.open_rows = n

    def cancel(self) -> None:
        """Stop generating for this request (from any thread; its rows leave at the next step)."""
        self.cancelled = True


class Row:
    """One choice of a request being generated."""

    def __init__(self, req: Request, index: int, layer_name: str, tokenizer: Any,
                 device: Optional[torch.device] = None):
        self.req, self.index, self.layer_name = req, index, layer_name
        self.text = TextStream(tokenizer, req.params.stop)
        self.length = 0  # real entries in the cache
        self.last = 0  # the last token
        self.generated = 0
        self.generator: Optional[torch.Generator] = None
        if req.params.temperature > 0:
            seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device or "cpu").manual_seed((seed + index) % 2**63)


class Engine:
    """The engine thread (see the module docstring). ``metrics``: an object with the hooks of
    :class:`peftkit.serve.metrics.Metrics` (or None)."""

    def __init__(self, host: AdapterHost, store: AdapterStore, tokenizer: Any, *, max_batch: int = 256,
                 max_prefill_tokens: int = 8192, max_waiting: int = 4096, metrics: Any = None):
        self.host, self.store, self.tok = host, store, tokenizer
        self.max_batch, self.max_prefill_tokens, self.max_waiting = max_batch, max_prefill_tokens, max_waiting
        # CPU: prefill forwards of at most PREFILL_TOKENS (measured faster per token than larger ones)
        self.prefill_tokens = PREFILL_TOKENS if host.device.type == "cpu" else max_prefill_tokens
        self.metrics = metrics
        use_decode_attention(host.base)  # CPUs: one-token steps as two batched products; the rest is SDPA
        self.batch = RunningBatch(self.max_batch)
        self.waiting: deque[Request] = deque()
        self.context = int(getattr(host.base.config, "max_position_embeddings", 0) or 0) or None
        eos = getattr(getattr(host.base, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self._logits_to_keep = accepts(host.base.forward, "logits_to_keep")
        self._cond = threading.Condition()
        self._stop = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="peftkit-engine", daemon=True)

    # -- any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, req: Request) -> None:
        """Queue ``req`` (and have its adapter installed); ServeError 429 when the queue is full, 404 when
        the adapter is gone."""
        if len(self.waiting) >= self.max_waiting:
            raise ServeError("The server is busy (too many waiting requests); retry later.", status=429,
                             code="queue_full")
        if req.adapter != self.host.base_name:
            self.store.request_install(req.adapter)
        with self._cond:
            self.waiting.append(req)
            self._cond.notify_all()

    def queue_length(self) -> int:
        return len(self.waiting)

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    break
                if not self.batch.rows and not self._admissible():
                    self._cond.wait(timeout=0.05)
            try:
                self.store.apply(self.host, self._in_use())
                with torch.inference_mode():
                    self._iteration()
            except Exception as exc:  # a failed step fails its rows, never the engine
                self._fail_all(exc)
        self._fail_all(ServeError("The server is shutting down.", status=503))

    def _in_use(self) -> set[str]:
        return {r.req.adapter for r in self.batch.rows} | {q.adapter for q in self.waiting}

    def _admissible(self) -> bool:
        return any(self._ready(q) for q in self.waiting)

    def _ready(self, req: Request) -> bool:
        return req.adapter == self.host.base_name or self.store.installed(req.adapter)

    def _iteration(self) -> None:
        self._expire()
        rows = self._admit()
        if rows:
            self._prefill_all(rows)
        if self.batch.rows:
            self._decode()
        if self.metrics is not None:
            self.metrics.engine_state(len(self.waiting), len(self.batch))

    def _expire(self) -> None:
        now = time.monotonic()
        for req in [q for q in self.waiting if q.cancelled or now > q.deadline]:
            self.waiting.remove(req)
            if not req.cancelled:
                req.deliver(Event("error", error=ServeError("The request timed out.", status=504, code="timeout")))
            else:
                req.deliver(Event("error", error=ServeError("The request was cancelled.", status=499)))
        for req in list(self.waiting):
            adapter = self.store.get(req.adapter) if req.adapter != self.host.base_name else None
            if req.adapter != self.host.base_name and (adapter is None or adapter.state == "failed"):
                self.waiting.remove(req)
                why = adapter.error if adapter is not None else "it was unloaded"
                req.deliver(Event("error", error=ServeError(f"Adapter {req.adapter!r} could not be loaded: {why}",
                                                            status=400 if adapter else 404, code="adapter_load_failed")))
        gone = [i for i, r in enumerate(self.batch.rows) if r.req.cancelled or now > r.req.deadline]
        if gone:
            for i in gone:
                row = self.batch.rows[i]
                if not row.req.cancelled and row.req.open_rows > 0:
                    row.req.open_rows = 0
                    row.req.deliver(Event("error", error=ServeError("The request timed out.", status=504,
                                                                    code="timeout")))
            self.batch.keep([i for i in range(len(self.batch.rows)) if i not in set(gone)])

    def _admit(self) -> list[Row]:
        rows: list[Row] = []
        budget = self.max_prefill_tokens
        for req in list(self.waiting):
            if len(self.batch) + len(rows) + req.n > self.max_batch:
                break
            if not self._ready(req):
                continue
            cost = req.n * len(req.prompt_ids)
            if rows and cost > budget:
                break
            budget -= cost
            self.waiting.remove(req)
            self.store.touch(req.adapter)
            layer_name = self.host.layer_name(req.adapter)
            rows.extend(Row(req, i, layer_name, self.tok, self.host.device) for i in range(req.n))
        return rows

    def _forward(self, rows: list[Row], inputs: dict[str, Any]) -> torch.Tensor:
        """The last position's logits (rows, vocab) of one forward of ``rows`` through their adapters."""
        routed = (mixed_batch([r.layer_name for r in rows], static=True) if self.host.layers is not None
                  else contextlib.nullcontext())  # static: adapters change only between forwards
        with routed:
            out = self.host.base(**inputs, use_cache=True)
        self.steps += 1
        return out.logits[:, -1].float()

    def _entries(self, row: Row) -> int:
        """The cache entries a row's prefill makes (its adapter's virtual tokens and its prompt)."""
        t = self.host.tokens.get(row.req.adapter)
        return len(row.req.prompt_ids) + (t.n if t is not None else 0)

    def _prefill_all(self, rows: list[Row]) -> None:
        """Prefill newly admitted ``rows``: grouped by length; in a group, rows of one adapter side by side,
        adapters in the layers' order (the batched adapter matmuls then read each adapter's tokens in
        place); cut into forwards of at most ``prefill_tokens``, the longest first (the shorter ones then
        join the batch's cache in place)."""
        order = {name: i for i, name in enumerate(self.host.installed())}
        entries = {id(r): self._entries(r) for r in rows}
        pieces = []
        for group in length_groups(rows, [entries[id(r)] for r in rows]):
            group = sorted(group, key=lambda r: order.get(r.layer_name, -1))
            pieces += prefill_pieces(group, [entries[id(r)] for r in group], self.prefill_tokens)
        pieces.sort(key=lambda piece: -max(entries[id(r)] for r in piece))
        left = len(rows)
        for piece in pieces:
            left -= len(piece)
            self._prefill(piece, more=left)

    def _prefill(self, rows: list[Row], more: int = 0) -> None:
        """Prefill ``rows`` and add them to the running batch (``more`` rows join after them)."""
        tokens = [self.host.tokens.get(r.req.adapter) for r in rows]
        pre = build_prefill(self.host.base, [r.req.prompt_ids for r in rows], tokens, self.host.device,
                            self.host.dtype)
        if self._logits_to_keep:
            pre.inputs["logits_to_keep"] = 1
        logits = self._forward(rows, pre.inputs)
        for row, length in zip(rows, pre.lengths):
            row.length = length
        if self.metrics is not None:
            self.metrics.prefill(len(rows), sum(len(r.req.prompt_ids) for r in rows))
        start = len(self.batch)
        self.batch.add(rows, pre.inputs["past_key_values"], pre.inputs["attention_mask"], more)
        self._advance(logits, first=start)

    def _decode(self) -> None:
        rows = self.batch.rows
        t0 = time.monotonic()
        inputs = self.batch.step_inputs([r.last for r in rows], [r.length for r in rows])
        logits = self._forward(rows, inputs)
        for row in rows:
            row.length += 1
        if self.metrics is not None:
            self.metrics.decode_step(len(rows), time.monotonic() - t0)
        self._advance(logits, first=0)

    def _advance(self, logits: torch.Tensor, first: int) -> None:
        """Pick the next token of rows ``first..`` of the batch (``logits`` holds theirs), tell their
        requests, and let finished rows leave."""
        rows = self.batch.rows[first:]
        picks = pick_tokens(logits, [r.req.params for r in rows], [r.generator for r in rows])
        keep = list(range(first))
        now = time.monotonic()
        for j, (row, (token, logprob, top)) in enumerate(zip(rows, picks)):
            if self._push(row, token, logprob, top, now):
                keep.append(first + j)
        self.batch.keep(keep)

    def _push(self, row: Row, token: int, logprob: Optional[float], top: list, now: float) -> bool:
        """Record ``token`` for ``row``; False when the row is done."""
        req, params = row.req, row.req.params
        row.last, row.generated = token, row.generated + 1
        req.generated += 1
        if req.first_token_at is None:
            req.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - req.created)
        eos = token in self.eos and not params.ignore_eos
        text = "" if eos else row.text.push(token)
        req.deliver(Event("token", row.index, text, token, logprob, top))
        reason = None
        if eos or row.text.stopped:
            reason = "stop"
        elif row.generated >= params.max_tokens or (self.context is not None and row.length >= self.context):
            reason = "length"
        if reason is None:
            return True
        req.deliver(Event("done", row.index, row.text.finish(), finish_reason=reason))
        req.open_rows -= 1
        return False

    def _fail_all(self, exc: Exception) -> None:
        err = exc if isinstance(exc, ServeError) else ServeError(
            f"Generation failed: {type(exc).__name__}: {exc}", status=500, code="engine_error")
        seen = set()
        for row in self.batch.rows:
            if row.req.id not in seen:
                seen.add(row.req.id)
                row.req.deliver(Event("error", error=err))
        self.batch = RunningBatch(self.max_batch)
        if isinstance(exc, ServeError) and exc.status == 503:
            while self.waiting:
                self.waiting.popleft().deliver(Event("error", error=err))


def length_groups(rows: list, lengths: list[int], waste: float = 0.25, most: int = 4) -> list[list]:
    """``rows`` cut into at most ``most`` groups of similar ``lengths`` (rows sorted by length, a new group
    started where padding to the group's longest row would add more than ``waste`` of its real
    tokens), so that a prefill of prompts of different lengths computes little padding."""
    if len(rows) <= 1:
        return [rows] if rows else []
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        group = groups[-1]
        padded = lengths[i] * (len(group) + 1)
        real = sum(lengths[j] for j in group) + lengths[i]
        if padded > (1 + waste) * real and len(groups) < most:
            groups.append([i])
        else:
            group.append(i)
    return [[rows[i] for i in group] for group in groups]


def prefill_pieces(rows: list, lengths: list[int], most_tokens: int) -> list[list]:
    """``rows`` (in their order) cut into consecutive pieces whose padded size (rows x the piece's longest
    length) is at most ``most_tokens``; a piece has at least one row."""
    pieces: list[list] = []
    piece: list = []
    longest = 0
    for row, n in zip(rows, lengths):
        if piece and (len(piece) + 1) * max(longest, n) > most_tokens:
            pieces.append(piece)
            piece, longest = [], 0
        piece.append(row)
        longest = max(longest, n)
    return pieces + [piece] if piece else pieces


def pick_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[Optional[torch.Generator]]
                ) -> list[tuple[int, Optional[float], list[tuple[int, float]]]]:
    """Each row's next token (greedy, or sampled at its temperature within its top-p nucleus) with its
    log-probability under the model and the ``logprobs`` most likely alternatives, when asked for.

    Top-p keeps the most likely tokens whose probabilities, before adding the token, sum to less than
    ``top_p`` (so at least one token), as transformers' ``TopPLogitsWarper`` does."""
    picks = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            scaled = logits[i] / p.temperature
            if p.top_p < 1.0:
                probs, order = torch.softmax(scaled, -1).sort(descending=True)
                drop = (probs.cumsum(0) - probs) >= p.top_p
                scaled = scaled.clone()
                scaled[order[drop]] = float("-inf")
            picks[i] = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generators[i]))
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[tuple[int, Optional[float], list[tuple[int, float]]]] = [(t, None, []) for t in picks]
    if wanted:
        lp = torch.log_softmax(logits[wanted], -1)
        for j, i in enumerate(wanted):
            k = params[i].logprobs or 0
            top = lp[j].topk(k) if k else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            out[i] = (picks[i], float(lp[j, picks[i]]), alts)
    return out


__all__ = ["Engine", "Event", "Request", "Row", "SamplingParams", "length_groups", "pick_tokens", "prefill_pieces"]
