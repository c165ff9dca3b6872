"""More scenarios from the same test files: local model paths as strings, best-model reload, subfolders,
a pretrained adapter continued with DPO, evaluation."""
import os

import torch
from datasets import Dataset

from common import IDS, MODEL_DIR, base_model, has_tuner_layer, records, saved_lora_folder, tokenizer
from test_trl_peft import check_training, frozen_snapshot, lora, pref_data, sft_data, targs, trainable_snapshot


def test_sft_model_path_string_with_peft_config(tmp_path):
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=MODEL_DIR, args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=sft_data(),
                         processing_class=tokenizer(), peft_config=lora())
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)


def test_sft_peft_with_evaluation(tmp_path):
    from trl import SFTConfig, SFTTrainer
    args = targs(SFTConfig, tmp_path, max_length=64, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = SFTTrainer(model=base_model(), args=args, train_dataset=sft_data(), eval_dataset=sft_data(8),
                         processing_class=tokenizer(), peft_config=lora())
    trainer.train()
    assert any("eval_loss" in h for h in trainer.state.log_history)


def test_load_adapter_from_subfolder(tmp_path):
    _, ref = saved_lora_folder(tmp_path / "sub")
    model = base_model()
    model.load_adapter(str(tmp_path), adapter_kwargs={"subfolder": "sub"})
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref)


def test_trainer_add_adapter_best_model_at_end(tmp_path):
    from peft import LoraConfig
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    tok = tokenizer()
    model = base_model()
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = Dataset.from_list([tok(r["source"] + " " + r["target"], truncation=True, max_length=32)
                              for r in records(24)])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps",
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data.select(range(16)), eval_dataset=data.select(range(16, 24)),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert "adapter_model.safetensors" in os.listdir(best)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    now = model.get_adapter_state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(now[k.removeprefix("base_model.model.")], v)


def test_dpo_continues_a_pretrained_adapter(tmp_path):
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer
    saved_lora_folder(tmp_path / "adapter")
    model = PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter"), is_trainable=True)
    trainer = DPOTrainer(model=model, args=targs(DPOConfig, tmp_path, max_length=96), train_dataset=pref_data(),
                         processing_class=tokenizer())
    assert "ref" in trainer.model.peft_config
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    assert tr and all(".default." in n for n in tr)
    trainer.train()
    check_training(trainer, tr, fr)
    trainer.save_model(str(tmp_path / "final"))
    assert "adapter_config.json" in os.listdir(tmp_path / "final")


def test_peft_model_generate_and_merge_after_sft(tmp_path):
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=base_model(), args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=sft_data(),
                         processing_class=tokenizer(), peft_config=lora(init_lora_weights=False))
    trainer.train()
    from peft import PeftModel
    trainer.save_model(str(tmp_path / "final"))
    pm = PeftModel.from_pretrained(base_model(), str(tmp_path / "final")).eval()  # TRL patches its own model's forward
    with torch.no_grad():
        ref = pm(IDS).logits
        out = pm.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(IDS).logits, ref, atol=1e-5, rtol=1e-4)
    assert out.shape[1] == IDS.shape[1] + 4 and not has_tuner_layer(merged)
