"""Training a peftkit PeftModel inside ``transformers.Trainer`` with adapter-only checkpoints.

transformers recognises only Hugging Face PEFT's own ``PeftModel`` class when it saves: for any
other wrapper it writes the full ``state_dict`` (every frozen base weight) into each checkpoint.
:class:`PeftkitTrainer` is a small ``Trainer`` subclass that saves and loads the adapter folder
instead, through the public :meth:`~peftkit.PeftModel.save_pretrained`, and leaves every other part of
``Trainer`` (optimizer and scheduler states, RNG states, ``trainer_state.json``, resuming, best-model
tracking, distributed training) as transformers does it. Nothing in transformers is patched::

    from peftkit.train import PeftkitTrainer
    trainer = PeftkitTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds, ...)
    trainer.train()                       # checkpoint-*/ hold adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)

A plain ``transformers.Trainer`` also trains a peftkit PeftModel (it is an ``nn.Module``); only its
checkpoints are then full model state dicts.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import transformers

from ..checkpoint import load_peft_weights, set_peft_model_state_dict
from ..config import CONFIG_NAME
from ..errors import CheckpointError
from ..model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"


class PeftkitTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose saved models and checkpoints hold only the adapter(s)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = self._peft_model()
        if peft_model is not None and self.args.label_names is None:
            # Trainer reads the label names off forward()'s signature; PeftModel.forward takes **kwargs
            from transformers.utils import find_labels

            self.label_names = find_labels(type(peft_model.get_base_model()))

    def _peft_model(self) -> Optional[PeftModel]:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False) if hasattr(self, "accelerator") \
            else self.model
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        peft_model = self._peft_model()
        if peft_model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        peft_model.save_pretrained(output_dir, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_adapters(self, folder: str, model: Optional[Any] = None) -> None:
        peft_model = model if isinstance(model, PeftModel) else self._peft_model()
        assert peft_model is not None
        for name in peft_model.peft_config:
            sub = folder if name == "default" else os.path.join(folder, name)
            if not os.path.isfile(os.path.join(sub, CONFIG_NAME)):
                raise CheckpointError(f"{sub} holds no adapter {name!r} to resume from.")
            set_peft_model_state_dict(peft_model, load_peft_weights(sub), name, source=sub)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[Any] = None) -> None:
        if self._peft_model() is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_adapters(resume_from_checkpoint, model)
        return None

    def _load_best_model(self) -> None:
        if self._peft_model() is None:
            return super()._load_best_model()
        self._load_adapters(self.state.best_model_checkpoint)
        return None


__all__ = ["PeftkitTrainer"]
