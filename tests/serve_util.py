"""Helpers of the serve tests: adapters of every kind for the bundled model, and a real server on a free port.

``make_adapters(root, count)`` writes ``count`` adapter folders (cycling through LoRA, DoRA, IA3,
bottleneck, prompt tuning, P-tuning, prefix tuning, P-tuning v2) with non-zero weights, so every adapter
changes the greedy outputs. ``running_server(...)`` starts ``peftkit serve``'s app in-process with
uvicorn on 127.0.0.1 (port 0: the system picks a free one) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch

import peftkit
from peftkit import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                     PromptTuningConfig, get_peft_model)

KINDS = ["lora", "ia3", "prompt", "prefix", "dora", "bottleneck", "ptuning", "ptuning_v2"]


def config_for(kind: str, i: int) -> Any:
    task = "CAUSAL_LM"
    if kind == "lora":
        return LoraConfig(task_type=task, r=4 + i % 3, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if kind == "dora":
        return LoraConfig(task_type=task, r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    if kind == "ia3":
        return IA3Config(task_type=task, target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])
    if kind == "bottleneck":
        return BottleneckConfig(task_type=task, style="pfeiffer", reduction_factor=8)
    if kind == "prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=3 + i % 4)
    if kind == "ptuning":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=4, encoder_hidden_size=32)
    if kind == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=2 + i % 3, prefix_projection=True,
                                  encoder_hidden_size=32)
    if kind == "ptuning_v2":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=5)
    raise ValueError(kind)


def make_adapter(folder: str, kind: str, i: int, seed: int) -> None:
    """Write one adapter folder of ``kind`` for the bundled model, with non-zero weights."""
    model, _ = peftkit.load_model()
    torch.manual_seed(seed)
    pm = get_peft_model(model, config_for(kind, i))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                scale = {"prompt": 3.0, "ptuning": 3.0, "ia3": 1.0}.get(kind, 0.5 if "prefix" in kind or "v2" in kind
                                                                         else 0.2)
                p.add_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(folder)


def make_adapters(root: Any, count: int, kinds: Optional[list[str]] = None) -> dict[str, str]:
    """``count`` adapter folders under ``root`` named ``<kind>-<i>``: {name: folder}."""
    kinds = kinds or KINDS
    out = {}
    for i in range(count):
        kind = kinds[i % len(kinds)]
        name = f"{kind}-{i}"
        folder = str(root / name)
        make_adapter(folder, kind, i, seed=100 + i)
        out[name] = folder
    return out


def offline_model(adapters: dict[str, str]) -> dict[str, Any]:
    """{name: model that generates with that adapter} (one PeftModel per adapter, the reference)."""
    out = {}
    for name, folder in adapters.items():
        model, _ = peftkit.load_model()
        out[name] = peftkit.PeftModel.from_pretrained(model, folder, adapter_name=name).eval()
    return out


def offline_tokens(model: Any, tok: Any, prompt: str, max_new: int, name: Optional[str]) -> list[int]:
    """Greedy tokens ``model.generate`` makes for ``prompt`` with adapter ``name`` (None: a plain model)."""
    ids = tok(prompt, return_tensors="pt")
    kwargs = {"adapter_names": [name]} if name is not None else {}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id, **kwargs)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@contextlib.contextmanager
def running_server(options: Any = None, model: Any = None, tokenizer: Any = None) -> Iterator[tuple[str, Any]]:
    """(base URL ending in /v1, the Server) of a real server on 127.0.0.1 with a free port."""
    import uvicorn

    from peftkit.serve.app import create_app
    from peftkit.serve.server import ServeOptions, Server

    server = Server(options or ServeOptions(), model=model, tokenizer=tokenizer)
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not web.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = web.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1", server
    finally:
        web.should_exit = True
        thread.join(timeout=30)
        server.close()


class Reply:
    """A plain HTTP reply: ``status_code``, ``text``, ``json()``."""

    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.text)


def http(method: str, url: str, json_body: Any = None, content: Optional[bytes] = None,
         headers: Optional[dict] = None, timeout: float = 120) -> Reply:
    """One HTTP request with the standard library (errors are replies too)."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(json_body).encode() if json_body is not None else content
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read())
