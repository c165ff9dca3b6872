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
import time
from concurrent.futures import Future
from importlib import resources
from typing import Any, Optional

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Event, Request as GenRequest, SamplingParams
from .errors import ServeError
from .protocol import (ChatRequest, Choice, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, chat_body,
                       chat_logprobs, chat_prompt_ids, completion_body, completion_logprobs, new_id, usage)
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


class Job:
    """The engine requests of one API call (one per prompt, ``n`` rows each) and their merged events."""

    def __init__(self, server: Server, model: str, prompts: list[list[int]], params: SamplingParams, n: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = n
        self.choices = [Choice() for _ in range(n * len(prompts))]
        self.open = len(self.choices)
        self.prompt_tokens = sum(len(p) * n for p in prompts)
        self.requests = [GenRequest(model, p, params, self._listener(i), n=n, timeout=server.options.request_timeout)
                         for i, p in enumerate(prompts)]

    def _listener(self, prompt_index: int) -> Any:
        def deliver(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt_index, event))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass
        return deliver

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self) -> Any:
        """(choice index, event) until every choice is done; raises the first error."""
        while self.open:
            p, event = await self.queue.get()
            if event.kind == "error":
                self.cancel()
                raise event.error
            i = p * self.n + event.index
            c = self.choices[i]
            if event.kind == "token":
                c.tokens.append(event.token)
                c.text += event.text
                if event.logprob is not None:
                    c.logprobs.append((event.token, event.logprob, event.top))
            else:
                c.text += event.text
                c.finish_reason = event.finish_reason
                self.open -= 1
            yield i, event

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
    make = chat_body if chat else completion_body
    out = make(rid, body.model, job.choices, server.tokenizer, bool(want_logprobs), body.return_token_ids,
               job.prompt_tokens)
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
        async for i, event in job.events():
            piece = _piece(server, i, event, chat, want_logprobs, body.return_token_ids)
            if piece is not None:
                yield chunk([piece])
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


def _piece(server: Server, i: int, event: Event, chat: bool, want_logprobs: bool, token_ids: bool
           ) -> Optional[dict]:
    """The streamed choice for one event (None when it carries nothing to send)."""
    tok = server.tokenizer
    entry = [(event.token, event.logprob, event.top)] if want_logprobs and event.logprob is not None else []
    if event.kind == "token" and not event.text and not entry and not token_ids:
        return None
    item: dict[str, Any] = {"index": i, "finish_reason": event.finish_reason}
    if chat:
        item["delta"] = {"content": event.text} if event.text or event.kind == "token" else {}
        item["logprobs"] = chat_logprobs(tok, entry) if entry else None
    else:
        item["text"] = event.text
        item["logprobs"] = completion_logprobs(tok, entry) if entry else None
    if token_ids:
        item["token_ids"] = [event.token] if event.kind == "token" else []
    return item


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
