"""Run outputs: ``metrics.jsonl``, ``loss.png``, the resource report, console lines.

Only the main process (rank 0) writes; :class:`MetricsLog` is a no-op elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

from .._io import atomic_write_bytes, human_bytes


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logging or eval event, each with ``step``."""

    def __init__(self, path: str, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []

    def load(self, up_to_step: Optional[int] = None) -> None:
        """Read an existing log (resume): keep the events up to ``up_to_step`` and rewrite the file."""
        if not os.path.isfile(self.path):
            return
        events = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run may be cut short
                step = ev.get("step", 0) if isinstance(ev, dict) else None
                if not isinstance(step, (int, float)) or isinstance(step, bool):
                    continue  # not an event of ours
                if up_to_step is None or step <= up_to_step:
                    events.append(ev)
        self.events = events
        if self.enabled:
            atomic_write_bytes(self.path, "".join(json.dumps(e) + "\n" for e in events).encode())

    def reset(self) -> None:
        """Start the log over (a run from step 0): no event of an earlier run in this folder stays."""
        self.events = []
        if self.enabled and os.path.exists(self.path):
            atomic_write_bytes(self.path, b"")

    def log(self, event: dict[str, Any]) -> None:
        event = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in event.items()}
        self.events.append(event)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def plot_losses(events: list[dict[str, Any]], path: str, title: str = "") -> bool:
    """Train and eval loss against the step, as a PNG (atomically). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    import io

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train" and "loss" in e]
    ev = [(e["step"], e["eval_loss"]) for e in events if e.get("event") == "eval" and "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if train or ev:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def folder_bytes(folder: str) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            total += os.path.getsize(os.path.join(root, name))
    return total


def peak_memory(device: Any) -> dict[str, int]:
    """Peak GPU memory allocated by torch (on a GPU) and the peak resident memory of this process."""
    import torch

    out: dict[str, int] = {}
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_cpu_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)
    except ImportError:  # pragma: no cover - Windows
        pass
    return out


def print_report(title: str, rows: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    print(f"== {title}", file=file)
    width = max(len(k) for k in rows) if rows else 0
    for key, value in rows.items():
        print(f"   {key.ljust(width)}  {value}", file=file)
    file.flush()


__all__ = ["MetricsLog", "folder_bytes", "human_bytes", "peak_memory", "plot_losses", "print_report"]
