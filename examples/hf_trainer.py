"""A peftkit PeftModel trained by transformers.Trainer, with checkpoints that hold only the adapter.

``peftkit.train.PeftkitTrainer`` is a small ``transformers.Trainer`` subclass: it saves and loads
the adapter folder (adapter_config.json + adapter_model.safetensors) where transformers would write
the whole model's state dict for a model class it does not know. Everything else is the ordinary
Trainer. Trains LoRA on the bundled model and E2E data, resumes from a checkpoint, and prints what a
checkpoint holds and how long it took.

    pip install -e ".[test]" && python examples/hf_trainer.py     # needs accelerate, as transformers.Trainer does
"""

from __future__ import annotations

import os
import tempfile
import time

import torch


def main() -> None:
    start = time.perf_counter()
    import transformers

    import peftkit
    from peftkit.train import PeftkitTrainer
    from peftkit.train.collate import collate
    from peftkit.train.config import DataConfig
    from peftkit.train.data import prepare_data

    model, tokenizer = peftkit.load_model()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(DataConfig(), tokenizer, lambda fmt: "CAUSAL_LM")  # the bundled E2E NLG demo data

    class Examples(torch.utils.data.Dataset):
        def __init__(self, split):
            self.examples = split.examples

        def __len__(self):
            return len(self.examples)

        def __getitem__(self, i):
            return self.examples[i]

    def collator(examples):  # right-padded, labels -100 on prompt and padding
        return collate(examples, tokenizer.pad_token_id, "CAUSAL_LM")

    config = peftkit.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear")
    peft_model = peftkit.get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=60, save_steps=30, per_device_train_batch_size=16, learning_rate=5e-3,
            logging_steps=10, eval_strategy="steps", eval_steps=30, per_device_eval_batch_size=16,
            report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        trainer = PeftkitTrainer(model=peft_model, args=args, train_dataset=Examples(data.train),
                                 eval_dataset=Examples(data.eval), data_collator=collator)
        trainer.train()
        print("eval:", {k: round(v, 4) for k, v in trainer.evaluate().items() if k == "eval_loss"})
        ckpt = os.path.join(out, "checkpoint-30")
        files = {f: os.path.getsize(os.path.join(ckpt, f)) for f in sorted(os.listdir(ckpt))}
        print(f"{ckpt} holds: " + ", ".join(f"{f} ({b:,} B)" for f, b in files.items()))
        assert "model.safetensors" not in files, "the checkpoint should hold only the adapter"
        # resume: a fresh model continues from checkpoint-30 to the same final adapter
        final = {k: v.detach().clone() for k, v in peftkit.get_peft_model_state_dict(peft_model).items()}
        fresh = peftkit.get_peft_model(peftkit.load_model()[0], config)
        trainer2 = PeftkitTrainer(model=fresh, args=args, train_dataset=Examples(data.train),
                                  eval_dataset=Examples(data.eval), data_collator=collator)
        trainer2.train(resume_from_checkpoint=ckpt)
        again = peftkit.get_peft_model_state_dict(fresh)
        diff = max(float((final[k] - again[k].detach()).abs().max()) for k in final)
        print(f"resumed from checkpoint-30: max difference to the uninterrupted adapter {diff:.2e}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
