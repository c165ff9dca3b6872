"""Pruning: weights set to zero by magnitude or Wanda, unstructured or N:M, with their masks.

* :mod:`~peftkit.prune.masks`: scores (magnitude ``|W|``, Wanda ``|W|·‖X‖₂``) and keep-masks (per
  layer, per row, global, N:M), pure functions on tensors with the math in the docstring;
* :mod:`~peftkit.prune.calibration`: the input norms Wanda needs, from calibration batches (forward
  hooks), and :func:`calibration_batches` to tokenize texts into batches;
* :mod:`~peftkit.prune.targets`: which layers are pruned (nn.Linear, transformers Conv1D; not the head);
* :mod:`~peftkit.prune.unstructured`: :func:`prune_model` (in place, all checks first), applying,
  saving and loading masks, :func:`sparsity_report`;
* :mod:`~peftkit.prune.structured` (with :mod:`~peftkit.prune.architectures`): :func:`structured_prune`
  removes whole attention heads and MLP channels physically (Llama, GPT-2, BERT), :func:`save_structured` /
  :func:`load_structured`.

Masks are ``torch.bool`` tensors of the stored weight's shape, True = kept.
"""

from .calibration import calibration_batches, collect_input_norms, target_input_norms
from .masks import (
    check_nm,
    check_sparsity,
    global_masks,
    layer_mask,
    magnitude_scores,
    n_pruned,
    nm_mask,
    parse_nm,
    row_mask,
    wanda_scores,
)
from .structured import (
    StructuredResult,
    config_describes_model,
    load_structured,
    save_structured,
    structure_of,
    structured_prune,
)
from .targets import DEFAULT_EXCLUDE, prune_targets
from .unstructured import (
    METHODS,
    SCOPES,
    LayerSparsity,
    PruneResult,
    SparsityReport,
    apply_masks,
    load_masks,
    prune_model,
    save_masks,
    sparsity_report,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "METHODS",
    "SCOPES",
    "LayerSparsity",
    "PruneResult",
    "SparsityReport",
    "StructuredResult",
    "apply_masks",
    "calibration_batches",
    "check_nm",
    "check_sparsity",
    "collect_input_norms",
    "config_describes_model",
    "global_masks",
    "layer_mask",
    "load_masks",
    "load_structured",
    "magnitude_scores",
    "n_pruned",
    "nm_mask",
    "parse_nm",
    "prune_model",
    "prune_targets",
    "row_mask",
    "save_masks",
    "save_structured",
    "sparsity_report",
    "structure_of",
    "structured_prune",
    "target_input_norms",
    "wanda_scores",
]
