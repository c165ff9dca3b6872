"""``peftkit serve`` as users start it: a subprocess, no arguments (the bundled model plus the adapters of
the last ``peftkit train`` runs), the real ``openai`` client, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from peftkit.cli.serve import build_serve_parser, last_runs  # noqa: E402

from .serve_util import http, make_adapter  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_run(runs, name: str, kind: str, seed: int, base: str = "stories260k") -> str:
    """A folder laid out as ``peftkit train`` leaves it: runs/<name>/adapter."""
    folder = runs / name / "adapter"
    make_adapter(str(folder), kind, 0, seed)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = f"/somewhere/{base}"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def test_last_runs_picks_the_newest_runs_of_this_base(tmp_path):
    runs = tmp_path / "runs"
    for i, name in enumerate(["old", "mid", "new"]):
        fake_run(runs, name, "lora", i)
        os.utime(runs / name / "adapter", (1000 + i, 1000 + i))
    fake_run(runs, "other", "lora", 9, base="llama-7b")
    (runs / "broken").mkdir()
    assert [n for n, _ in last_runs(str(runs), 2, "/x/stories260k")] == ["new", "mid"]
    assert last_runs(str(tmp_path / "none"), 8, "stories260k") == []
    from peftkit.cli.args import UsageError

    with pytest.raises(UsageError, match="--max-adapters"):
        build_serve_parser().parse_args(["--max-adapters", "0"])


@pytest.mark.slow
def test_peftkit_serve_with_no_arguments_serves_the_last_runs(tmp_path):
    fake_run(tmp_path / "runs", "e2e-lora", "lora", 1)
    fake_run(tmp_path / "runs", "e2e-prefix", "prefix", 2)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "serve", "--port", str(port), "--threads", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models[0] == "stories260k" and sorted(models[1:]) == ["e2e-lora", "e2e-prefix"]
        outs = {m: client.completions.create(model=m, prompt="Once upon a time", max_tokens=8, temperature=0)
                .choices[0].text for m in models}
        assert len(set(outs.values())) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "serving the adapters of the last peftkit train runs in" in err and "e2e-prefix" in err
    assert '"event": "request"' in err  # one structured log line per request


def test_engine_vllm_checks_adapters_and_prints_its_command(tmp_path, capsys):
    from peftkit.cli import main

    make_adapter(str(tmp_path / "good"), "lora", 0, 1)
    make_adapter(str(tmp_path / "dora"), "dora", 0, 2)
    assert main(["serve", "--engine", "vllm", "--adapter", f"good={tmp_path / 'good'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server" in out and f"good={tmp_path / 'good'}" in out
    assert "--enable-lora" in out
    assert main(["serve", "--engine", "vllm", "--adapter", f"d={tmp_path / 'dora'}", "--dry-run"]) != 0
    assert "DoRA" in capsys.readouterr().err
