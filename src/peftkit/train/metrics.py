"""Task metrics: perplexity (LMs), accuracy and F1 (classification), exact match and ROUGE-L (generation).

All are computed from sums that add up across processes (:class:`MetricSums`), so a data-parallel
evaluation gives the same numbers as a single process.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Optional

import torch


_PUNCTUATION = frozenset(string.punctuation)


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, single spaces (the SQuAD normalisation, without article removal)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_text(prediction) == normalize_text(reference))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over lower-cased word tokens: 2·P·R / (P + R) with P, R from the LCS."""
    p, r = _tokens(prediction), _tokens(reference)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def f1_from_confusion(confusion: torch.Tensor) -> float:
    """Binary: F1 of class 1. More classes: the macro average of the per-class F1."""
    confusion = confusion.double()
    tp = confusion.diag()
    fp = confusion.sum(0) - tp  # predicted c, truly other
    fn = confusion.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.zeros_like(tp))
    if confusion.shape[0] == 2:
        return float(f1[1])
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    return float(f1[present].mean()) if present.any() else 0.0


class MetricSums:
    """Sums of an evaluation: loss, token or example count, confusion matrix, generation scores."""

    def __init__(self, num_labels: Optional[int] = None) -> None:
        self.loss_sum = 0.0
        self.count = 0.0
        self.confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64) if num_labels else None
        self.em_sum = 0.0
        self.rouge_sum = 0.0
        self.generated = 0.0

    def add_classification(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        assert self.confusion is not None
        k = self.confusion.shape[0]
        idx = labels.long().cpu() * k + predictions.long().cpu()
        self.confusion += torch.bincount(idx, minlength=k * k).reshape(k, k).double()

    def add_generation(self, prediction: str, reference: str) -> None:
        self.em_sum += exact_match(prediction, reference)
        self.rouge_sum += rouge_l(prediction, reference)
        self.generated += 1

    def as_tensor(self) -> torch.Tensor:
        parts = [torch.tensor([self.loss_sum, self.count, self.em_sum, self.rouge_sum, self.generated], dtype=torch.float64)]
        if self.confusion is not None:
            parts.append(self.confusion.flatten())
        return torch.cat(parts)

    def load_tensor(self, t: torch.Tensor) -> None:
        self.loss_sum, self.count, self.em_sum, self.rouge_sum, self.generated = (float(x) for x in t[:5])
        if self.confusion is not None:
            k = self.confusion.shape[0]
            self.confusion = t[5:].reshape(k, k).clone()

    def result(self, task_type: str, prefix: str = "eval_") -> dict[str, float]:
        out: dict[str, float] = {}
        if self.count:
            loss = self.loss_sum / self.count
            out[prefix + "loss"] = loss
            if task_type != "SEQ_CLS":
                out[prefix + "perplexity"] = math.exp(min(loss, 50.0))
        if self.confusion is not None and self.confusion.sum() > 0:
            out[prefix + "accuracy"] = float(self.confusion.diag().sum() / self.confusion.sum())
            out[prefix + "f1"] = f1_from_confusion(self.confusion)
        if self.generated:
            out[prefix + "exact_match"] = self.em_sum / self.generated
            out[prefix + "rouge_l"] = self.rouge_sum / self.generated
        return out


__all__ = ["MetricSums", "exact_match", "f1_from_confusion", "normalize_text", "rouge_l"]
