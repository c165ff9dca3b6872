"""``peftkit serve``: one base model and many adapters of every kind behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser, adapter_specs, int_at_least

EPILOG = """examples:
  peftkit serve                                  # the bundled model + the adapters of your last peftkit train runs
  peftkit serve --model M --adapter a=runs/a/adapter --adapter b=runs/b/adapter --port 8000
  peftkit serve --model M --adapter-dir adapters/ --max-adapters 16 --api-keys keys.yaml
  peftkit serve --engine vllm --model M --adapter a=A --dry-run   # check LoRA folders for vLLM, print its command

clients: the openai package (base_url=http://HOST:PORT/v1, model=<adapter name or the base's id>), curl, the
playground page at http://HOST:PORT/. Adapters are loaded on first use and evicted least-recently-used beyond
--max-adapters; admins load more at run time with POST /v1/load_lora_adapter (folders inside --adapter-dir only)."""


def build_serve_parser() -> Parser:
    p = Parser(prog=f"{PROG} serve", formatter_class=Formatter, epilog=EPILOG,
               description="Serve a base model and its adapters (LoRA, DoRA, IA3, bottleneck, prompt tuning, "
                           "P-tuning, prefix tuning, ...) with continuous batching: every request runs in one "
                           "shared batch, each row through its own adapter.")
    p.add_argument("--model", help="base model folder or Hub id (default: the bundled stories260k)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR", help="an adapter (repeat)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="serve every adapter folder in DIR (DIR/x or DIR/x/adapter, named x); also the only "
                        "folders POST /v1/load_lora_adapter may load from (repeat)")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="with no --adapter/--adapter-dir: serve the adapters of the last peftkit train runs in DIR")
    p.add_argument("--last-runs", type=int_at_least(0, "--last-runs"), default=8, metavar="N", help="how many of those runs")
    p.add_argument("--base-name", help="the base model's id in the API (default: its folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_at_least(0, "--port"), default=8000)
    p.add_argument("--max-adapters", type=int_at_least(1, "--max-adapters"), default=32, help="adapters installed at once (LRU)")
    p.add_argument("--max-batch", type=int_at_least(1, "--max-batch"), default=256, help="rows decoded together")
    p.add_argument("--max-prefill-tokens", type=int_at_least(1, "--max-prefill-tokens"), default=8192,
                   help="prompt tokens prefilled in one forward")
    p.add_argument("--max-waiting", type=int_at_least(1, "--max-waiting"), default=4096, help="queued requests before 429")
    p.add_argument("--max-tokens-limit", type=int_at_least(1, "--max-tokens-limit"), default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-request-bytes", type=int_at_least(1024, "--max-request-bytes"), default=1 << 20, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"),
                   help="require this key (Authorization: Bearer KEY); default $PEFTKIT_API_KEY")
    p.add_argument("--api-keys", metavar="FILE", help="JSON/YAML file mapping keys to tenants and their models")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int_at_least(1, "--threads"),
                   help="torch threads (default: the cores torch would use, less one left to the HTTP server and "
                        "its clients, at least 1)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--engine", default="peftkit", choices=["peftkit", "vllm"],
                   help="vllm: check every adapter against the base for vLLM, then start vLLM's server (LoRA only)")
    p.add_argument("--dry-run", action="store_true", help="with --engine vllm: check and print the command only")
    return p


def last_runs(folder: str, count: int, base: str) -> list[tuple[str, str]]:
    """(name, adapter folder) of the newest ``count`` runs in ``folder`` whose adapter was trained on ``base``."""
    if count == 0 or not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        adapter = os.path.join(folder, entry, "adapter")
        try:
            with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        trained_on = str(config.get("base_model_name_or_path") or "")
        if trained_on and os.path.basename(os.path.normpath(trained_on)) != os.path.basename(os.path.normpath(base)):
            continue
        found.append((os.path.getmtime(adapter), entry, adapter))
    return [(name, path) for _, name, path in sorted(found, reverse=True)[:count]]


def options_from(args: Any) -> Any:
    from ..serve.server import ServeOptions
    from ..train.modeling import default_model_path

    adapters = adapter_specs(args.adapter) if args.adapter else []
    if not args.adapter and not args.adapter_dir:
        adapters = last_runs(args.runs, args.last_runs, args.model or default_model_path())
        where = os.path.abspath(args.runs)
        if adapters:
            print(f"serving the adapters of the last peftkit train runs in {where}: "
                  + ", ".join(f"{n} ({p})" for n, p in adapters), file=sys.stderr)
        else:
            print(f"no --adapter given and no peftkit train runs of this base model in {where}: serving the base "
                  "model only", file=sys.stderr)
    return ServeOptions(model=args.model, adapters=adapters, adapter_dirs=list(args.adapter_dir),
                        base_name=args.base_name, max_adapters=args.max_adapters, max_batch=args.max_batch,
                        max_prefill_tokens=args.max_prefill_tokens, max_waiting=args.max_waiting,
                        max_tokens_limit=args.max_tokens_limit, max_request_bytes=args.max_request_bytes,
                        request_timeout=args.request_timeout, api_key=args.api_key, api_keys_file=args.api_keys,
                        dtype=args.dtype, device=args.device, threads=args.threads)


def cmd_vllm(args: Any) -> int:
    """``--engine vllm``: check every LoRA adapter against the base for vLLM, print vLLM's command, run it."""
    from ..serve.adapters import scan_folder
    from ..serve.vllm import serve_with_vllm
    from ..train.modeling import default_model_path

    adapters = dict(adapter_specs(args.adapter)) if args.adapter else {}
    for root in args.adapter_dir:
        if not os.path.isdir(root):
            raise PeftkitError(f"--adapter-dir {root} is not a folder.")
        adapters.update((n, p) for n, p in scan_folder(root) if n not in adapters)
    return serve_with_vllm(args.model or default_model_path(), adapters, host=args.host, port=args.port,
                           max_loras=min(args.max_adapters, max(1, len(adapters))), dry_run=args.dry_run)


def cmd_serve(argv: Optional[list[str]] = None) -> int:
    args = build_serve_parser().parse_args(argv)
    if args.engine == "vllm":
        return cmd_vllm(args)
    if args.dry_run:
        raise PeftkitError("--dry-run goes with --engine vllm.")
    import uvicorn

    from ..serve.app import create_app
    from ..serve.server import OPEN, Server

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(message)s", stream=sys.stderr)
    server = Server(options_from(args))
    try:
        names = ", ".join(f"{m['id']} ({m['peftkit']['method']})" for m in server.models_for(OPEN)[1:]) or "none"
        print(f"peftkit serve: {server.base_name} with adapters: {names}", file=sys.stderr)
        print(f"listening on http://{args.host}:{args.port}/v1 (playground: http://{args.host}:{args.port}/)",
              file=sys.stderr)
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        server.close()
    return 0


__all__ = ["build_serve_parser", "cmd_serve", "cmd_vllm", "last_runs", "options_from"]
