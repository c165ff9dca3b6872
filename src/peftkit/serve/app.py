"""The HTTP routes of ``peftkit serve`` (FastAPI on uvicorn: the web stack transformers' own
``transformers serve`` uses, maintained, with the pydantic request models the OpenAI schema maps onto).

Routes: ``GET /`` (the playground), ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events ending with ``data: [DONE]``), ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (vLLM's names; adapters of any method).

Every failure is answered as OpenAI's error JSON with a 4xx/5xx status; a client that goes away
cancels its request (its rows leave the batch at the next step). One JSON log line per request goes
to the ``peftkit.serve`` logger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from importlib import resources
from typing import Any, Optional

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Event, Request as GenRequest, SamplingParams
from .errors import ServeError
from .protocol import (ChatRequest, Choice, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest,
                       chat_logprobs, chat_prompt_ids, completion_logprobs, new_id, response_body, usage)
from .server import Server

log = logging.getLogger("peftkit.serve")


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, ServeError(f"The request body is over {self.limit} bytes.", status=413))
        seen, started = 0, False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyLimit.TooLarge()
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyLimit.TooLarge:
            if not started:
                await _send_json(send, ServeError(f"The request body is over {self.limit} bytes.", status=413))


async def _send_json(send: Any, err: ServeError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(server: Server) -> Any:
    """The ASGI application of ``server`` (wrapped in the body-size limit)."""
    app = FastAPI(title="peftkit serve", version="1", docs_url="/docs", redoc_url=None)
    _handlers(app)
    _routes(app, server)
    return BodyLimit(app, server.options.max_request_bytes)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        text = f"Invalid request: {where}: {message}" if where else f"Invalid request: {message}"
        return error_response(ServeError(text, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ServeError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(ServeError(f"Internal error: {type(exc).__name__}", status=500))


def _routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = server.engine is not None and server.engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("peftkit.serve").joinpath("static/playground.html")
        if not page.is_file():
            raise ServeError("The playground page is not installed.", status=404)
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(authorization: Optional[str] = Header(None)) -> dict:
        return {"object": "list", "data": server.models_for(server.tenant(authorization))}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, authorization: Optional[str] = Header(None)) -> dict:
        tenant = server.tenant(authorization)
        server.check_model(tenant, model_id)
        return next(m for m in server.models_for(tenant) if m["id"] == model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          authorization: Optional[str] = Header(None)) -> Any:
        return await _generate(server, body, request, authorization, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, authorization: Optional[str] = Header(None)) -> Any:
        return await _generate(server, body, request, authorization, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest, authorization: Optional[str] = Header(None)) -> dict:
        server.check_admin(server.tenant(authorization))
        if body.lora_name == server.base_name:
            raise ServeError(f"{body.lora_name!r} is the base model's name.", status=409, param="lora_name")
        adapter = server.store.register(body.lora_name, server.store.allowed_path(body.lora_path))
        done: Future = Future()
        server.store.request_install(body.lora_name, done)
        try:
            await asyncio.wrap_future(done)
        except ServeError:
            if server.store.get(body.lora_name) is adapter:
                server.store.unregister(body.lora_name)
            raise
        return {"object": "adapter", "id": body.lora_name, "method": adapter.method, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest, authorization: Optional[str] = Header(None)) -> dict:
        server.check_admin(server.tenant(authorization))
        await asyncio.wrap_future(server.store.unregister(body.lora_name))
        return {"object": "adapter", "id": body.lora_name, "status": "unloaded"}


class Mailbox:
    """Events from the engine thread to the event loop, handed over in batches: one wake-up of the loop
    per engine step instead of one per token (each ``call_soon_threadsafe`` is a system call and a
    loop iteration)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


def mailbox() -> Mailbox:
    """The running event loop's mailbox."""
    loop = asyncio.get_running_loop()
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class Job:
    """The engine requests of one API call (one per prompt, ``n`` rows each) and their merged events."""

    def __init__(self, server: Server, model: str, prompts: list[list[int]], params: SamplingParams, n: int):
        self.mailbox = mailbox()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = n
        self.choices = [Choice() for _ in range(n * len(prompts))]
        self.open = len(self.choices)
        self.prompt_tokens = sum(len(p) * n for p in prompts)
        self.requests = [GenRequest(model, p, params, self._listener(i), n=n, timeout=server.options.request_timeout)
                         for i, p in enumerate(prompts)]

    def _listener(self, prompt_index: int) -> Any:
        def deliver(event: Event) -> None:
            self.mailbox.post(self.queue, (prompt_index, event))
        return deliver

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self) -> Any:
        """Lists of (choice index, event), each all the events that had arrived, until every choice is
        done; raises the first error. A slow reader gets several tokens at once, not a backlog."""
        while self.open:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            out = []
            for p, event in items:
                if event.kind == "error":
                    self.cancel()
                    raise event.error
                i = p * self.n + event.index
                self._record(self.choices[i], event)
                out.append((i, event))
            yield out

    def _record(self, c: Choice, event: Event) -> None:
        if event.kind == "token":
            c.tokens.append(event.token)
            c.text += event.text
            if event.logprob is not None:
                c.logprobs.append((event.token, event.logprob, event.top))
        else:
            c.text += event.text
            c.finish_reason = event.finish_reason
            self.open -= 1

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    @property
    def first_token_at(self) -> Optional[float]:
        times = [r.first_token_at for r in self.requests if r.first_token_at is not None]
        return min(times) if times else None


def _prepare(server: Server, body: Any, chat: bool) -> tuple[list[list[int]], SamplingParams]:
    body.check_unsupported()
    tok = server.tokenizer
    if chat:
        prompts = [chat_prompt_ids(tok, body.messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs if body.logprobs else None
        logprobs = (top or 0) if body.logprobs else None
    else:
        prompts = [list(tok(p).input_ids) if isinstance(p, str) else list(p) for p in body.prompts()]
        max_tokens, logprobs = body.max_tokens, body.logprobs
    if max_tokens is None:
        max_tokens = min(server.default_max_tokens(len(p)) for p in prompts)
    for p in prompts:
        server.check_prompt(p, max_tokens, body.n * len(prompts))
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stops(),
                            logprobs=logprobs, ignore_eos=body.ignore_eos)
    return prompts, params


async def _generate(server: Server, body: Any, request: Request, authorization: Optional[str], chat: bool) -> Any:
    tenant = server.tenant(authorization)
    server.check_model(tenant, body.model)
    prompts, params = _prepare(server, body, chat)
    job = Job(server, body.model, prompts, params, body.n)
    submitted = []
    try:
        for r in job.requests:
            server.engine.submit(r)
            submitted.append(r)
    except ServeError:
        job.cancel()
        raise
    rid = new_id("chatcmpl" if chat else "cmpl")
    info = {"id": rid, "tenant": tenant.name, "model": body.model, "stream": body.stream, "started": time.monotonic()}
    if body.stream:
        return StreamingResponse(_stream(server, job, body, rid, chat, info), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(server, job, body, request, rid, chat, info)


async def _collect(server: Server, job: Job, body: Any, request: Request, rid: str, chat: bool, info: dict) -> Any:
    async def consume() -> None:
        async for _ in job.events():
            pass

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():  # the client went away
        job.cancel()
        work.cancel()
        _finish(server, job, info, 499)
        return Response(status_code=499)
    try:
        work.result()
    except ServeError as err:
        _finish(server, job, info, err.status, error=str(err))
        raise
    want_logprobs = body.logprobs if chat else body.logprobs is not None
    out = response_body(rid, body.model, job.choices, server.tokenizer, bool(want_logprobs), body.return_token_ids,
                        job.prompt_tokens, chat)
    _finish(server, job, info, 200)
    return out


async def _stream(server: Server, job: Job, body: Any, rid: str, chat: bool, info: dict) -> Any:
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    want_logprobs = body.logprobs if chat else body.logprobs is not None
    status = 200

    def chunk(choices: list, **extra: Any) -> str:
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": body.model,
                                      "choices": choices, **extra}) + "\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(job.choices))])
        async for batch in job.events():
            pieces = _pieces(server, batch, chat, want_logprobs, body.return_token_ids)
            if pieces:
                yield "".join(chunk([piece]) for piece in pieces)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=usage(job.prompt_tokens, job.completion_tokens))
        yield "data: [DONE]\n\n"
    except ServeError as err:
        status = err.status
        yield "data: " + json.dumps(err.body()) + "\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = 499
        raise
    finally:
        job.cancel()
        _finish(server, job, info, status)


def _pieces(server: Server, batch: list, chat: bool, want_logprobs: bool, token_ids: bool) -> list[dict]:
    """The streamed choices for a batch of events: one per choice, its tokens' text joined, in the order
    the choices first appear (a choice that ends gets its finish_reason in it)."""
    merged: dict[int, list[Event]] = {}
    for i, event in batch:
        merged.setdefault(i, []).append(event)
    tok = server.tokenizer
    out = []
    for i, events in merged.items():
        text = "".join(e.text for e in events)
        tokens = [e for e in events if e.kind == "token"]
        entries = [(e.token, e.logprob, e.top) for e in tokens if e.logprob is not None] if want_logprobs else []
        finish = next((e.finish_reason for e in events if e.kind == "done"), None)
        if not text and not entries and finish is None and not (token_ids and tokens):
            continue
        item: dict[str, Any] = {"index": i, "finish_reason": finish}
        if chat:
            item["delta"] = {"content": text} if text or tokens else {}
            item["logprobs"] = chat_logprobs(tok, entries) if entries else None
        else:
            item["text"] = text
            item["logprobs"] = completion_logprobs(tok, entries) if entries else None
        if token_ids:
            item["token_ids"] = [e.token for e in tokens]
        out.append(item)
    return out


def _finish(server: Server, job: Job, info: dict, status: int, error: Optional[str] = None) -> None:
    now = time.monotonic()
    first = job.first_token_at
    server.metrics.request_done(info["model"], status, job.prompt_tokens, job.completion_tokens)
    record = {"event": "request", "id": info["id"], "tenant": info["tenant"], "model": info["model"],
              "stream": info["stream"], "status": status, "prompt_tokens": job.prompt_tokens,
              "completion_tokens": job.completion_tokens,
              "ttft_ms": round((first - info["started"]) * 1000, 1) if first else None,
              "duration_ms": round((now - info["started"]) * 1000, 1),
              "finish_reasons": [c.finish_reason for c in job.choices]}
    if error:
        record["error"] = error
    log.info(json.dumps(record))


__all__ = ["BodyLimit", "create_app"]
