"""Scenarios of TRL's PEFT tests (test_sft/dpo/grpo/rloo/kto/reward_trainer.py) on the bundled model."""
import os

import pytest
import torch
from datasets import Dataset

from common import IDS, base_model, records, tokenizer

STEPS = 3


def targs(cls, out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return cls(**base)


def lora(**kw):
    from peft import LoraConfig
    d = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    d.update(kw)
    return LoraConfig(**d)


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def check_training(trainer, trainable, frozen, adapter=".default"):
    """TRL's check: every trainable parameter changed (lora_A may lag one step), frozen ones did not."""
    from peft import PeftModel
    assert isinstance(trainer.model, PeftModel)
    assert trainer.state.log_history[-1]["train_loss"] is not None
    params = dict(trainer.model.named_parameters())
    assert trainable, "nothing trainable"
    changed = [n for n, p in trainable.items() if not torch.equal(p, params[n])]
    assert changed, "no trainable parameter changed"
    assert all(adapter in n or "prompt_encoder" in n or "modules_to_save" in n for n in changed), changed
    for n, p in frozen.items():
        if ".ref." in n or n not in params:
            continue
        assert torch.equal(p, params[n]), f"frozen {n} changed"
    return changed


def sft_data(n=12):
    return Dataset.from_list([{"prompt": r["source"] + "\n", "completion": r["target"]} for r in records(n)])


def lm_data(n=12):
    return Dataset.from_list([{"text": r["source"] + "\n" + r["target"]} for r in records(n)])


def pref_data(n=12):
    rows = records(n + 1)
    return Dataset.from_list([{"prompt": r["source"] + "\n", "chosen": r["target"], "rejected": rows[i + 1]["target"]}
                              for i, r in enumerate(rows[:n])])


def prompt_data(n=8):
    return Dataset.from_list([{"prompt": r["source"] + "\n"} for r in records(n)])


def reward_short(completions, **_):
    return [-abs(20 - len(c)) / 20.0 for c in completions]


# ---------------------------------------------------------------- SFT
@pytest.mark.parametrize("given", ["config", "model"])
def test_sft_peft(tmp_path, given):
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer
    model, extra = base_model(), {}
    if given == "model":
        model = get_peft_model(model, lora())
    else:
        extra["peft_config"] = lora()
    trainer = SFTTrainer(model=model, args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=sft_data(),
                         processing_class=tokenizer(), **extra)
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)
    trainer.save_model(str(tmp_path / "final"))
    files = os.listdir(tmp_path / "final")
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "model.safetensors" not in files


def test_sft_peft_language_modeling_all_linear_and_reload(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=base_model(), args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=lm_data(),
                         processing_class=tokenizer(), peft_config=lora(target_modules="all-linear"))
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)
    assert not any("lm_head.lora" in n for n in tr)  # all-linear excludes the output layer
    assert any("gate_proj.lora" in n for n in tr)
    trainer.save_model(str(tmp_path / "final"))
    # (the trainer's model gives other logits than a fresh copy even with adapters disabled, with real PEFT
    # too: TRL patches its forward. So compare the reloaded adapter tensors and the effect on the fresh base.)
    from peft import get_peft_model_state_dict
    again = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ours, theirs = get_peft_model_state_dict(trainer.model), get_peft_model_state_dict(again)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k])
    with torch.no_grad():
        assert not torch.allclose(again(IDS).logits, base_model()(IDS).logits, atol=1e-4)


def test_sft_peft_gradient_checkpointing(tmp_path):
    from trl import SFTConfig, SFTTrainer
    args = targs(SFTConfig, tmp_path, max_length=64, gradient_checkpointing=True)
    trainer = SFTTrainer(model=base_model(), args=args, train_dataset=sft_data(), processing_class=tokenizer(),
                         peft_config=lora())
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)


def test_sft_peft_modules_to_save(tmp_path):
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=base_model(), args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=sft_data(),
                         processing_class=tokenizer(), peft_config=lora(modules_to_save=["lm_head"]))
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    assert any("modules_to_save" in n for n in tr)
    trainer.train()
    changed = check_training(trainer, tr, fr)
    assert any("modules_to_save" in n for n in changed)


def test_sft_peft_trainable_token_indices(tmp_path):
    from trl import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=base_model(), args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=sft_data(),
                         processing_class=tokenizer(),
                         peft_config=lora(trainable_token_indices={"embed_tokens": [1, 2, 3, 300]}))
    tr = trainable_snapshot(trainer.model)
    assert any("trainable_tokens" in n for n in tr)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(tr[n], params[n]) for n in tr if "trainable_tokens" in n)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_sft_prompt_learning(tmp_path, kind):
    import peft
    from trl import SFTConfig, SFTTrainer
    cfg = {"prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
           "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
           "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                        encoder_hidden_size=16)}[kind]()
    trainer = SFTTrainer(model=base_model(), args=targs(SFTConfig, tmp_path, max_length=64), train_dataset=sft_data(),
                         processing_class=tokenizer(), peft_config=cfg)
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert tr and any(not torch.equal(tr[n], params[n]) for n in tr)
    for n, p in fr.items():
        assert torch.equal(p, params[n]), n
    trainer.save_model(str(tmp_path / "final"))
    assert "adapter_config.json" in os.listdir(tmp_path / "final")


# ---------------------------------------------------------------- DPO
@pytest.mark.parametrize("given", ["config", "model"])
def test_dpo_peft(tmp_path, given):
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer
    model, extra = base_model(), {}
    if given == "model":
        torch.manual_seed(0)
        model = get_peft_model(model, lora(init_lora_weights=False))
    else:
        extra["peft_config"] = lora()
    trainer = DPOTrainer(model=model, args=targs(DPOConfig, tmp_path, max_length=96), train_dataset=pref_data(),
                         processing_class=tokenizer(), **extra)
    assert trainer.ref_model is None
    if given == "model":
        assert "ref" in trainer.model.peft_config
        sd = trainer.model.state_dict()
        for k in sd:
            if ".default." in k and "lora" in k:
                torch.testing.assert_close(sd[k.replace(".default.", ".ref.")], sd[k])
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)
    if given == "model":
        params = dict(trainer.model.named_parameters())
        for n, p in fr.items():
            if ".ref." in n:
                assert torch.equal(p, params[n]), "reference adapter changed"


def test_dpo_peft_precompute_ref_log_probs(tmp_path):
    from trl import DPOConfig, DPOTrainer
    args = targs(DPOConfig, tmp_path, max_length=96, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=base_model(), args=args, train_dataset=pref_data(), processing_class=tokenizer(),
                         peft_config=lora())
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)


def test_dpo_peft_gradient_checkpointing(tmp_path):
    from trl import DPOConfig, DPOTrainer
    args = targs(DPOConfig, tmp_path, max_length=96, gradient_checkpointing=True)
    trainer = DPOTrainer(model=base_model(), args=args, train_dataset=pref_data(), processing_class=tokenizer(),
                         peft_config=lora())
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)


# ---------------------------------------------------------------- GRPO / RLOO
def _online(cls_name, tmp_path, given, **kw):
    import trl
    from peft import get_peft_model
    Config, Trainer = getattr(trl, cls_name + "Config"), getattr(trl, cls_name + "Trainer")
    model, extra = base_model(), {}
    if given == "model":
        model = get_peft_model(model, lora())
    else:
        extra["peft_config"] = lora()
    args = targs(Config, tmp_path, num_generations=4, max_completion_length=8, per_device_train_batch_size=4, **kw)
    trainer = Trainer(model=model, reward_funcs=reward_short, args=args, train_dataset=prompt_data(),
                      processing_class=tokenizer(), **extra)
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)


@pytest.mark.parametrize("given", ["config", "model"])
def test_grpo_peft(tmp_path, given):
    _online("GRPO", tmp_path, given)


def test_grpo_peft_with_beta(tmp_path):
    _online("GRPO", tmp_path, "config", beta=0.1)


def test_grpo_peft_gradient_checkpointing(tmp_path):
    _online("GRPO", tmp_path, "config", gradient_checkpointing=True)


def test_rloo_peft(tmp_path):
    _online("RLOO", tmp_path, "config")


# ---------------------------------------------------------------- KTO / reward
def test_kto_peft(tmp_path):
    from trl import KTOConfig, KTOTrainer
    rows = records(12)
    data = Dataset.from_list([{"prompt": r["source"] + "\n", "completion": r["target"], "label": i % 2 == 0}
                              for i, r in enumerate(rows)])
    trainer = KTOTrainer(model=base_model(), args=targs(KTOConfig, tmp_path, max_length=96), train_dataset=data,
                         processing_class=tokenizer(), peft_config=lora())
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    trainer.train()
    check_training(trainer, tr, fr)


def test_reward_peft(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from common import MODEL_DIR
    tok = tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rows = records(13)
    data = Dataset.from_list([{"chosen": r["source"] + " " + r["target"], "rejected": r["source"] + " " +
                               rows[i + 1]["target"]} for i, r in enumerate(rows[:12])])
    trainer = RewardTrainer(model=model, args=targs(RewardConfig, tmp_path, max_length=1024), train_dataset=data,
                            processing_class=tok, peft_config=lora(task_type="SEQ_CLS"))
    tr, fr = trainable_snapshot(trainer.model), frozen_snapshot(trainer.model)
    assert any("score" in n for n in tr)
    trainer.train()
    changed = check_training(trainer, tr, fr)
    assert any("score" in n for n in changed)
