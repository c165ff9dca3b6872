"""What ``peftkit prune`` and ``peftkit quantize`` measure and report about a compressed model, against the
model it came from: parameters and non-zeros, size on disk, forward latency, and the task metrics of
:func:`peftkit.train.evaluate` (loss / perplexity for language models, accuracy / F1 for classifiers).

Latency is the median wall time of a forward pass over one fixed batch of the evaluation data, the
models compared measured in alternation in the same process (the load of a shared machine falls on
all alike).
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

import torch
from torch import nn

from .._io import atomic_write_bytes
from .collate import collate
from .data import Dataset
from .loop import evaluate
from .reporting import folder_bytes

MASKS_FILE = "pruning_masks.safetensors"  # in a pruned model folder (peftkit prune): the keep-masks


def read_model_masks(model_path: str) -> dict[str, torch.Tensor]:
    """The keep-masks of a pruned model folder (``peftkit prune``); PeftkitError if it has none."""
    from ..errors import PeftkitError
    from ..prune import load_masks

    path = os.path.join(model_path, MASKS_FILE)
    if not os.path.isfile(path):
        raise PeftkitError(f"--keep-sparsity needs the masks of a pruned model: {model_path} has no {MASKS_FILE} "
                           "(write one with `peftkit prune`).")
    return load_masks(path)


def count_weights(model: nn.Module) -> dict[str, int]:
    """Parameters of ``model`` (shared tensors counted once) and how many of them are non-zero."""
    seen: set[int] = set()
    params = nonzeros = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nonzeros += int(torch.count_nonzero(p.detach()))
    return {"parameters": params, "nonzeros": nonzeros}


def latency_batch(dataset: Dataset, tokenizer: Any, task_type: str, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` evaluation examples as model inputs (no labels)."""
    batch = collate(dataset.examples[:batch_size], tokenizer.pad_token_id, task_type)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def forward_latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``model(**batch)`` without autograd, over ``repeats`` runs after ``warmup``
    (:func:`peftkit.quant.dynamic.latency`, the inputs moved to the model's device first)."""
    from ..quant.dynamic import latency

    device = next(iter(model.parameters())).device
    return 1000 * latency(model, {k: v.to(device) for k, v in batch.items()}, repeats=repeats, warmup=warmup)


def compare_latency_ms(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], rounds: int = 5,
                       repeats: int = 3) -> dict[str, float]:
    """Median forward milliseconds of each model on ``batch``, measured in alternation (``rounds`` rounds
    of ``repeats`` runs each, after one warm-up round), so that the machine's load falls on all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name, model in models.items():
            value = forward_latency_ms(model, batch, repeats=repeats, warmup=0)
            if round_:
                times[name].append(value)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(model: nn.Module, tokenizer: Any, dataset: Optional[Dataset], task_type: str,
            device: torch.device, folder: Optional[str] = None, batch_size: int = 16) -> dict[str, Any]:
    """One row of a compression report: weights, size on disk (of ``folder``), task metrics. Latency is
    measured apart, for the models compared together (:func:`compare_latency_ms`)."""
    row: dict[str, Any] = count_weights(model)
    row["sparsity"] = 1 - row["nonzeros"] / row["parameters"] if row["parameters"] else 0.0
    if folder is not None:
        row["size_bytes"] = folder_bytes(folder)
    if dataset is not None and len(dataset):
        row.update(evaluate(model, dataset, tokenizer, task_type=task_type, device=device, batch_size=batch_size))
    return row


def print_comparison(rows: dict[str, dict[str, Any]], file: Any = None) -> None:
    """The rows side by side (one column per model), with the ratio of the last to the first."""
    names = list(rows)
    keys = [k for k in rows[names[0]] if all(k in r for r in rows.values())]
    width = max(len(k) for k in keys) if keys else 8
    print(f"{'':<{width}}  " + "  ".join(f"{n:>14}" for n in names) + ("  ratio" if len(names) > 1 else ""),
          file=file)
    for k in keys:
        values = [rows[n][k] for n in names]
        cells = "  ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v:>14}" for v in values)
        ratio = ""
        if len(names) > 1 and isinstance(values[0], (int, float)) and values[0]:
            ratio = f"  {values[-1] / values[0]:.3f}"
        print(f"{k:<{width}}  {cells}{ratio}", file=file)


def write_report(folder: str, report: dict[str, Any]) -> str:
    """``folder/report.json`` (atomic); returns its path."""
    path = os.path.join(folder, "report.json")
    atomic_write_bytes(path, json.dumps(report, indent=2, default=str).encode())
    return path


def plot_layer_sparsity(layers: list[dict[str, Any]], path: str, title: str = "") -> bool:
    """A bar chart of each layer's sparsity (``[{"name", "sparsity"}]``); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)), 4))
    ax.bar(range(len(layers)), [row["sparsity"] for row in layers])
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([row["name"] for row in layers], rotation=90, fontsize=6)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["MASKS_FILE", "compare_latency_ms", "count_weights", "forward_latency_ms", "latency_batch", "measure", "plot_layer_sparsity",
           "print_comparison", "read_model_masks", "write_report"]
