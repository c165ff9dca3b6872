"""Smoke tests of the runnable examples (they double as documentation)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_lora_digits_cnn_example():
    pytest.importorskip("sklearn")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "lora_digits_cnn.py")], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    after = next(line for line in lines if line.startswith("after LoRA on digits 5-9"))
    assert float(after.rsplit(" ", 1)[1]) > 0.8  # from chance (0.2) to a working classifier
    assert any(line.startswith("done in") for line in lines)
