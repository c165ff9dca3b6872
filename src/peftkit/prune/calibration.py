"""Calibration statistics for Wanda: the L2 norm of every input feature of every target layer.

For a target layer with input ``x`` (..., in), over all calibration tokens ``t`` (every position of
every batch that is not padding):

    ‖X_j‖₂ = sqrt( Σ_t x_tj² )        (accumulated in float64, one value per input feature j)

The inputs are read with forward hooks while the model runs the batches (``torch.no_grad``, eval
mode; the model's training flags are restored afterwards). Padding is left out when a batch has an
``attention_mask`` (B, T): a layer input of shape (B, T, in), or (B·T, in) flattened, counts only
the positions where the mask is non-zero; other inputs (a pooler's (B, in), a decoder's inputs of
another length) count every row.

The library reads no data files: batches are dicts of tensors the model's forward accepts (e.g.
``{"input_ids", "attention_mask"}``); :func:`calibration_batches` makes them from a list of strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .targets import DEFAULT_EXCLUDE, Names, in_features, prune_targets

Batch = Mapping[str, Any]


class _NormAccumulator:
    """Σ x_j² (float64) and the number of tokens seen, for one layer."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.sum_sq = torch.zeros(width, dtype=torch.float64, device=device)
        self.tokens = 0
        self.mask: Optional[torch.Tensor] = None  # the current batch's attention mask (B, T), bool

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, torch.Tensor):
            return
        width = x.shape[-1]
        rows = x.detach().reshape(-1, width)
        keep = self._keep(x)
        if keep is not None:
            rows = rows[keep.reshape(-1).to(rows.device)]
        rows = rows.to(torch.float64)
        self.sum_sq += (rows * rows).sum(0).to(self.sum_sq.device)
        self.tokens += rows.shape[0]

    def _keep(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self.mask
        if mask is None:
            return None
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return mask
        if x.dim() == 2 and x.shape[0] == mask.numel() and mask.dim() == 2:
            return mask.reshape(-1)
        return None


def _attention_mask(batch: Batch) -> Optional[torch.Tensor]:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    return None


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collect_input_norms(model: nn.Module, batches: Iterable[Batch], target_modules: Names = None,
                        exclude: Names = DEFAULT_EXCLUDE) -> dict[str, torch.Tensor]:
    """{layer name: ‖X_j‖₂ (in,), float64} for every target layer (the targets of
    :func:`~peftkit.prune.prune_targets`), from running ``model(**batch)`` on each batch.

    ConfigError if ``batches`` is empty or not dicts, if the model's forward fails on one, or if a
    target layer receives no input (it is not used by the forward, or reads its weight directly).
    The model's weights are not changed; its train/eval flags are restored."""
    return target_input_norms(model, prune_targets(model, target_modules, exclude), batches)


def target_input_norms(model: nn.Module, targets: Mapping[str, nn.Module],
                       batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """:func:`collect_input_norms` for given targets ({module name in ``model``: the layer holding the weight})."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    accs = {key: _NormAccumulator(in_features(module), module.weight.device) for key, module in targets.items()}
    handles = [model.get_submodule(key).register_forward_pre_hook(acc.hook, with_kwargs=True)
               for key, acc in accs.items()]
    modes = {m: m.training for m in model.modules()}
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if not isinstance(batch, Mapping):
                    raise ConfigError(f"Calibration batch {i} is a {type(batch).__name__}; batches are dicts of "
                                      "tensors the model accepts, e.g. {'input_ids': ..., 'attention_mask': ...}.")
                mask = _attention_mask(batch)
                for acc in accs.values():
                    acc.mask = mask
                _run(model, _to_device(batch, device), i)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not seen:
        raise ConfigError("No calibration batches: Wanda needs at least one batch of inputs (see calibration_batches).")
    idle = [key for key, acc in accs.items() if acc.tokens == 0]
    if idle:
        raise ConfigError(f"{idle[0]} received no input during calibration ({len(idle)} layer(s) did not): it is not "
                          "called by the model's forward (or reads its weight directly). Leave it out of "
                          "target_modules, or prune it with method='magnitude'.")
    return {key: acc.sum_sq.sqrt() for key, acc in accs.items()}


def _run(model: nn.Module, batch: dict[str, Any], index: int) -> None:
    try:
        model(**batch)
    except ConfigError:
        raise
    except Exception as exc:  # the model's own errors: a wrong key, shape or dtype in the batch
        raise ConfigError(f"The model's forward failed on calibration batch {index} (keys {sorted(batch)}): "
                          f"{type(exc).__name__}: {exc}") from exc


def calibration_batches(tokenizer: Any, texts: Sequence[str], n_samples: int = 128, seq_len: int = 128,
                        batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Tokenize the first ``n_samples`` of ``texts`` into batches ``{"input_ids", "attention_mask"}``.

    Each text is tokenized on its own (the tokenizer's special tokens added), cut to ``seq_len``
    tokens, and right-padded to the longest text of its batch (pad id: the tokenizer's pad token,
    else its eos token, else 0; the attention mask is 0 there). Texts that give no token are skipped.
    The tokenizer is not modified. ConfigError for bad arguments or when no text gives a token."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must be a list of strings (the library reads no files: load them first).")
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    rows = [list(tokenizer(t)["input_ids"])[:seq_len] for t in texts[:n_samples]]
    rows = [r for r in rows if r]
    if not rows:
        raise ConfigError("No calibration text gave any token; pass non-empty texts.")
    pad = next((v for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if isinstance(v, int)), 0)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


__all__ = ["calibration_batches", "collect_input_norms", "target_input_norms"]
