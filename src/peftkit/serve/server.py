"""A server's parts put together: options, the model and its adapters, API keys, the engine.

:class:`ServeOptions` holds every setting of ``peftkit serve`` (the CLI maps its flags onto it);
:class:`Server` loads the base model, registers the adapters, starts the engine and answers the
questions the routes ask (who is this key, which models may it use, prompt checks).

API keys: ``--api-key KEY`` gives one key that may use everything; a keys file (JSON or YAML) maps keys
to tenants::

    keys:
      - {key: sk-tenant-a, tenant: a, models: [base, support-bot]}   # base: the base model's id
      - {key: sk-ops, tenant: ops, models: "*", admin: true}           # admin: may load/unload adapters

A key may use only the models listed ("*": all); ``/v1/models`` lists only those, and any other
model answers 404, as an unknown one does, so one tenant cannot even learn another's adapter names.
Without keys the server is open and every caller is an admin.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import PeftkitError
from .adapters import AdapterStore, scan_folder
from .engine import Engine
from .errors import ServeError
from .host import AdapterHost
from .metrics import Metrics


@dataclass
class ServeOptions:
    """Settings of one server (see ``peftkit serve --help`` for each)."""

    model: Optional[str] = None  # base model folder or Hub id (default: the bundled model)
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, folder)
    adapter_dirs: list[str] = field(default_factory=list)  # scanned at start, and the roots of runtime loads
    base_name: Optional[str] = None  # the base model's id in the API (default: the folder's name)
    max_adapters: int = 32
    max_batch: int = 256
    max_prefill_tokens: int = 8192
    max_waiting: int = 4096
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1 << 20
    request_timeout: float = 600.0
    api_key: Optional[str] = None
    api_keys_file: Optional[str] = None
    dtype: str = "auto"
    device: str = "cpu"
    threads: Optional[int] = None  # torch threads (None: torch's default less one, at least 1)


@dataclass
class Tenant:
    name: str
    models: Union[set[str], str]  # "*": all
    admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.models == "*" or model in self.models


OPEN = Tenant("anonymous", "*", admin=True)


def read_keys(api_key: Optional[str], path: Optional[str]) -> dict[str, Tenant]:
    """The API keys: ``{key: Tenant}`` ({} when the server is open). PeftkitError for a bad keys file."""
    keys: dict[str, Tenant] = {}
    if api_key:
        keys[api_key] = Tenant("default", "*", admin=True)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
            entries = data["keys"]
            for i, e in enumerate(entries):
                if not isinstance(e.get("key"), str) or len(e["key"]) < 8:
                    raise ValueError(f"entry {i}: 'key' must be a string of at least 8 characters")
                models = e.get("models", [])
                if models != "*" and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
                    raise ValueError(f"entry {i}: 'models' must be a list of model ids or \"*\"")
                keys[e["key"]] = Tenant(str(e.get("tenant", f"tenant{i}")), "*" if models == "*" else set(models),
                                        bool(e.get("admin", False)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PeftkitError(f"Cannot read the API keys file {path}: {exc}. It maps keys to tenants: "
                               "{\"keys\": [{\"key\": ..., \"tenant\": ..., \"models\": [...], \"admin\": false}]}.")
    return keys


class Server:
    """The base model, its adapters, the engine and the API keys of one ``peftkit serve``."""

    def __init__(self, options: ServeOptions, model: Any = None, tokenizer: Any = None):
        import torch

        self.options = options
        # one core is left to the HTTP thread and its clients: intra-op threads that wait for a busy
        # core stall every forward (measured: a 64-token request 8x slower with 2 threads on 2 busy cores)
        torch.set_num_threads(options.threads or max(1, torch.get_num_threads() - 1))
        self.keys = read_keys(options.api_key, options.api_keys_file)
        if model is None:
            model, tokenizer = load_base(options)
        path = options.model or getattr(model, "name_or_path", None) or "base"
        self.base_name = options.base_name or os.path.basename(os.path.normpath(str(path))) or "base"
        self.tokenizer = tokenizer
        self.metrics = Metrics()
        self.host = AdapterHost(model, self.base_name)
        self.engine: Optional[Engine] = None
        self.store = AdapterStore(options.adapter_dirs, options.max_adapters, wake=self._wake,
                                  on_event=self._adapter_event)
        for name, folder in options.adapters:
            self.store.register(name, folder)
        for root in options.adapter_dirs:
            if not os.path.isdir(root):
                raise PeftkitError(f"--adapter-dir {root} is not a folder.")
            for name, folder in scan_folder(root):
                if self.store.get(name) is None and name != self.base_name:
                    self.store.register(name, folder)
        self.engine = Engine(self.host, self.store, tokenizer, max_batch=options.max_batch,
                             max_prefill_tokens=options.max_prefill_tokens, max_waiting=options.max_waiting,
                             metrics=self.metrics)
        self.engine.start()
        for name in self.store.names()[:options.max_adapters]:  # install what fits now, not on first use
            self.store.request_install(name)

    def _wake(self) -> None:
        if self.engine is not None:
            self.engine.wake()

    def _adapter_event(self, event: str, name: str) -> None:
        self.metrics.adapter_event(event, name, len(self.host.installed()))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.store.close()

    # -- questions the routes ask ----------------------------------------------------------------
    def tenant(self, authorization: Optional[str]) -> Tenant:
        """The caller's tenant from its ``Authorization: Bearer`` header (ServeError 401 if wrong)."""
        if not self.keys:
            return OPEN
        token = ""
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        for key, tenant in self.keys.items():
            if token and hmac.compare_digest(token.encode(), key.encode()):
                return tenant
        raise ServeError("Invalid or missing API key (send Authorization: Bearer <key>).", status=401,
                         code="invalid_api_key")

    def models_for(self, tenant: Tenant) -> list[dict[str, Any]]:
        """The /v1/models entries ``tenant`` may see: the base model, then the adapters."""
        out = []
        if tenant.may_use(self.base_name):
            out.append({"id": self.base_name, "object": "model", "created": 0, "owned_by": "peftkit",
                        "root": self.base_name, "parent": None,
                        "peftkit": {"kind": "base", "method": None, "loaded": True}})
        for name in self.store.names():
            adapter = self.store.get(name)
            if adapter is None or not tenant.may_use(name):
                continue
            out.append({"id": name, "object": "model", "created": 0, "owned_by": "peftkit", "root": adapter.path,
                        "parent": self.base_name,
                        "peftkit": {"kind": "adapter", "method": adapter.method,
                                    "loaded": adapter.state == "installed"}})
        return out

    def check_model(self, tenant: Tenant, model: str) -> None:
        """ServeError 404 unless ``model`` exists and ``tenant`` may use it."""
        known = model == self.base_name or self.store.get(model) is not None
        if not known or not tenant.may_use(model):
            raise ServeError(f"The model {model!r} does not exist or you do not have access to it.", status=404,
                             code="model_not_found", param="model")

    def check_admin(self, tenant: Tenant) -> None:
        if not tenant.admin:
            raise ServeError("This key may not load or unload adapters.", status=403, code="forbidden")

    def check_prompt(self, ids: list[int], max_tokens: int, n: int) -> None:
        """ServeError 400 for an empty or too long prompt, a max_tokens above the limit, bad token ids."""
        vocab = self.host.base.get_input_embeddings().num_embeddings
        if not ids:
            raise ServeError("The prompt is empty.", param="prompt")
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise ServeError(f"Prompt token ids must be integers in [0, {vocab}).", param="prompt")
        if max_tokens > self.options.max_tokens_limit:
            raise ServeError(f"max_tokens is {max_tokens}; this server allows at most "
                             f"{self.options.max_tokens_limit}.", param="max_tokens")
        context = self.engine.context if self.engine is not None else None
        if context is not None and len(ids) + max_tokens > context:
            raise ServeError(f"This model's maximum context length is {context} tokens. However, you requested "
                             f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                             "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                             code="context_length_exceeded")
        if n > self.options.max_batch:
            raise ServeError(f"n is {n}; this server runs at most {self.options.max_batch} rows at once.", param="n")

    def default_max_tokens(self, prompt_len: int) -> int:
        context = self.engine.context if self.engine is not None else None
        room = (context - prompt_len) if context is not None else self.options.max_tokens_limit
        return max(1, min(self.options.max_tokens_limit, room))


def load_base(options: ServeOptions) -> tuple[Any, Any]:
    """The base model (eval, on ``options.device``) and its tokenizer (left padding is not needed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..train.modeling import default_model_path, load_tokenizer

    path = options.model or default_model_path()
    dtype: Any = "auto" if options.dtype == "auto" else getattr(torch, options.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise PeftkitError(f"Cannot load the base model {path!r}: {exc}") from None
    return model.to(options.device).eval(), load_tokenizer(path)


__all__ = ["OPEN", "ServeOptions", "Server", "Tenant", "load_base", "read_keys"]
