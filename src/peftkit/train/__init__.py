"""The fine-tuning toolkit on top of the library: training loop, data formats, metrics, plots,
resumable checkpoints, data parallelism, and the transformers.Trainer integration.

The core library never imports this package. Entry points::

    from peftkit.train import RunConfig, train        # what `peftkit train` runs
    from peftkit.train import PeftkitTrainer          # transformers.Trainer with adapter-only checkpoints
"""

from .config import DataConfig, ModelArgs, RunConfig, TrainConfig
from .data import DataError, prepare_data, read_records
from .evaluation import evaluate, generate_texts
from .loop import Trainer, TrainResult
from .metrics import exact_match, rouge_l
from .modeling import method_names
from .runner import load_for_inference, train


def __getattr__(name):  # transformers.Trainer integration, imported on first use
    if name == "PeftkitTrainer":
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'peftkit.train' has no attribute {name!r}")


__all__ = [
    "DataConfig",
    "DataError",
    "ModelArgs",
    "PeftkitTrainer",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "exact_match",
    "generate_texts",
    "load_for_inference",
    "method_names",
    "prepare_data",
    "read_records",
    "rouge_l",
    "train",
]
