"""The OpenAI request bodies the server takes, and the response objects it builds.

``/v1/completions`` and ``/v1/chat/completions`` follow the OpenAI API (the fields the ``openai`` client
sends), with vLLM's extensions ``ignore_eos`` and ``return_token_ids``. Fields the server cannot honour
(penalties, logit_bias, tools, echo, suffix, best_of) are refused with a 400 naming them unless they
carry their neutral value, rather than silently ignored. Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..train.data import plain_turn
from .errors import ServeError
from .text import token_text

MAX_STOPS = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says
    return_token_ids: bool = False  # vLLM's extension: the generated token ids in each choice

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ServeError(f"At most {MAX_STOPS} stop sequences.", param="stop")
        return tuple(s for s in stops if s)

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ServeError(f"{name} is not supported by peftkit serve.", param=name)
        if self.logit_bias:
            raise ServeError("logit_bias is not supported by peftkit serve.", param="logit_bias")


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ServeError("echo is not supported by peftkit serve.", param="echo")
        if self.suffix:
            raise ServeError("suffix is not supported by peftkit serve.", param="suffix")
        if self.best_of not in (None, self.n):
            raise ServeError("best_of is not supported by peftkit serve (use n).", param="best_of")

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ServeError("prompt is empty.", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ServeError("Only text content parts are supported.", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise ServeError("tools are not supported by peftkit serve.", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ServeError("response_format other than text is not supported by peftkit serve.",
                             param="response_format")


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=128)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The prompt of a conversation: the tokenizer's chat template with the generation prompt, or, for
    tokenizers without one, the plain format ``peftkit train`` trains chat data in (bos, then one
    ``Role: content`` line per message, then ``Assistant: ``)."""
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(plain_turn(m["role"], m["content"]) for m in plain) + plain_turn("assistant")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(text, add_special_tokens=False).input_ids)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Choice:
    """What one choice of a request has produced so far."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.finish_reason: Optional[str] = None


def completion_logprobs(tok: Any, entries: list, offset: int = 0) -> dict[str, Any]:
    """The completions API's ``logprobs`` object for (token, logprob, alternatives) entries."""
    tokens, lps, tops, offsets = [], [], [], []
    for token, lp, alts in entries:
        piece = token_text(tok, token)
        tokens.append(piece)
        lps.append(lp)
        tops.append({token_text(tok, t): v for t, v in alts} if alts else None)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok: Any, entries: list) -> dict[str, Any]:
    """The chat API's ``logprobs`` object (``content``: one entry per token)."""
    def item(token: int, lp: float) -> dict[str, Any]:
        piece = token_text(tok, token)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

    return {"content": [dict(item(t, lp), top_logprobs=[item(a, v) for a, v in alts]) for t, lp, alts in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(rid: str, model: str, choices: list[Choice], tok: Any, want_logprobs: bool, token_ids: bool,
                  prompt_tokens: int, chat: bool) -> dict[str, Any]:
    """The non-streamed response: a ``chat.completion`` (each choice a ``message``) or a ``text_completion``."""
    out = []
    for i, c in enumerate(choices):
        item: dict[str, Any] = {"index": i}
        if chat:
            item["message"] = {"role": "assistant", "content": c.text}
            item["logprobs"] = chat_logprobs(tok, c.logprobs) if want_logprobs else None
        else:
            item["text"] = c.text
            item["logprobs"] = completion_logprobs(tok, c.logprobs) if want_logprobs else None
        item["finish_reason"] = c.finish_reason
        if token_ids:
            item["token_ids"] = c.tokens
        out.append(item)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out, "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices))}


__all__ = ["ChatMessage", "ChatRequest", "Choice", "CompletionRequest", "LoadAdapterRequest", "StreamOptions",
           "UnloadAdapterRequest", "chat_logprobs", "chat_prompt_ids", "completion_logprobs", "new_id",
           "response_body", "usage"]
