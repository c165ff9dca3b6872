"""Runs one client tool with peftkit installed as ``peft``, in a process of its own (the test process
imports Hugging Face PEFT for the interop checks, and install_as_peft refuses once it is imported).

    python tests/as_peft_cases.py <case> <out_dir>

Writes ``<out_dir>/result.json`` (losses, what changed, which ``peft`` was imported) and, for training
cases, the adapter folder ``<out_dir>/adapter``; tests/test_integrations.py checks both. Every case
trains or evaluates the bundled model on a few steps of bundled data, on the CPU.
"""

from __future__ import annotations

import json
import os
import sys

import peftkit

peftkit.install_as_peft()  # before anything imports transformers' Trainer, TRL or lm-eval

import torch  # noqa: E402

DATA = peftkit.model_path().parent / "data"
IDS = [[1, 5, 9, 20, 33, 7, 2, 11]]  # the probe tests/test_integrations.py compares logits on


def records(n: int, split: str = "train") -> list[dict]:
    with open(DATA / f"e2e_nlg_{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def lora_config() -> peftkit.LoraConfig:
    return peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peftkit.get_peft_model_state_dict(model).items()}


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def losses(trainer, key: str = "loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def trl_args(cls, out: str, **kwargs):
    return cls(output_dir=out, max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
               report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, **kwargs)


def make_trl_model(given: str):
    """``given`` "model": a peftkit PeftModel is handed to the trainer; "config": a base model and a
    peftkit LoraConfig (the trainer calls get_peft_model)."""
    base, tok = peftkit.load_model()
    torch.manual_seed(0)
    if given == "model":
        return peftkit.get_peft_model(base, lora_config()), tok, {}
    return base, tok, {"peft_config": lora_config()}


def case_sft(out: str, given: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok, extra = make_trl_model(given)
    data = Dataset.from_list([{"prompt": r["source"] + "\n", "completion": r["target"]} for r in records(8)])
    trainer = SFTTrainer(model=model, args=trl_args(SFTConfig, out, max_length=64), train_dataset=data,
                         processing_class=tok, **extra)
    before = adapter_state(trainer.model)
    trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    return {"model_class": type(trainer.model).__module__ + "." + type(trainer.model).__name__,
            "losses": losses(trainer), "changed": changed(before, adapter_state(trainer.model)),
            "n_tensors": len(before)}


def case_dpo(out: str, given: str) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok, extra = make_trl_model(given)
    rows = records(9)
    data = Dataset.from_list([{"prompt": r["source"] + "\n", "chosen": r["target"], "rejected": rows[i + 1]["target"]}
                              for i, r in enumerate(rows[:8])])
    trainer = DPOTrainer(model=model, args=trl_args(DPOConfig, out, max_length=96), train_dataset=data,
                         processing_class=tok, **extra)
    peft_model = trainer.model
    before = adapter_state(peft_model)
    ref_before = {k: v.clone() for k, v in peft_model.state_dict().items() if ".ref." in k}
    base_before = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items()
                   if "lora_" not in k and "modules_to_save" not in k}
    trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    base_after = peft_model.get_base_model().state_dict()
    return {"losses": losses(trainer), "margins": losses(trainer, "rewards/margins"),
            "changed": changed(before, adapter_state(peft_model)), "n_tensors": len(before),
            "ref_model": trainer.ref_model is not None, "adapters": sorted(peft_model.peft_config),
            "ref_adapter_changed": changed(ref_before, {k: v for k, v in peft_model.state_dict().items()
                                                        if ".ref." in k}),
            "base_changed": changed(base_before, base_after),
            "parameters": sum(p.numel() for p in peft_model.parameters())}


def case_grpo(out: str, given: str) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok, extra = make_trl_model(given)
    data = Dataset.from_list([{"prompt": r["source"] + "\n"} for r in records(8)])

    def reward_short(completions, **_):  # prefer completions of about 20 characters
        return [-abs(20 - len(c)) / 20.0 for c in completions]

    args = trl_args(GRPOConfig, out, num_generations=4, max_completion_length=8)
    args.max_steps, args.per_device_train_batch_size = 4, 4
    trainer = GRPOTrainer(model=model, reward_funcs=reward_short, args=args, train_dataset=data,
                          processing_class=tok, **extra)
    before = adapter_state(trainer.model)
    trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    return {"losses": losses(trainer), "grad_norms": losses(trainer, "grad_norm"),
            "rewards": losses(trainer, "reward"), "changed": changed(before, adapter_state(trainer.model)),
            "n_tensors": len(before)}


def case_hf_trainer(out: str, given: str) -> dict:
    """transformers.Trainer itself (not PeftkitTrainer), default columns handling, evaluation, best model at end,
    checkpoints, then a second trainer resumes from the first checkpoint."""
    import transformers
    from datasets import Dataset

    model, tok, _ = make_trl_model("model")
    tok.pad_token = tok.pad_token or tok.eos_token

    def encode(r):
        ids = tok(r["source"] + "\n" + r["target"], truncation=True, max_length=48)["input_ids"]
        return {"input_ids": ids, "labels": ids}

    data = Dataset.from_list([encode(r) for r in records(40)])
    # best = the *highest* eval loss, so that the best checkpoint (the first) is not the last state trained
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps", per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], logging_steps=1, use_cpu=True, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True, disable_tqdm=True, seed=0)
    collator = transformers.DataCollatorForSeq2Seq(tok, padding=True)

    def trainer_for(peft_model):
        return transformers.Trainer(model=peft_model, args=args, train_dataset=data.select(range(32)),
                                    eval_dataset=data.select(range(32, 40)), data_collator=collator)

    trainer = trainer_for(model)
    before = adapter_state(model)
    trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    checkpoints = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    final = adapter_state(model)
    last = peftkit.load_peft_weights(os.path.join(out, "checkpoint-6"))
    best = peftkit.load_peft_weights(trainer.state.best_model_checkpoint)
    again, _, _ = make_trl_model("model")
    resumed = trainer_for(again)
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
    last_again = peftkit.load_peft_weights(os.path.join(out, "checkpoint-6"))
    return {"losses": losses(trainer), "eval_losses": losses(trainer, "eval_loss"),
            "changed": changed(before, final), "n_tensors": len(before),
            "checkpoints": {c: sorted(os.listdir(os.path.join(out, c))) for c in checkpoints},
            "best": os.path.basename(trainer.state.best_model_checkpoint),
            "final_is_best": all(torch.equal(best[k], final[k]) for k in best) and len(best) == len(final),
            "final_is_last": all(torch.equal(last[k], final[k]) for k in last),
            "resumed_step": resumed.state.global_step,
            "resumed_max_diff": max((last[k] - last_again[k]).abs().max().item() for k in last)}


def case_load_adapter(out: str, adapter: str) -> dict:
    """transformers' own adapter API on a plain PreTrainedModel: load_adapter, set/disable/enable, delete,
    from_pretrained(<adapter folder>), add_adapter + save_pretrained."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(IDS)
    model = AutoModelForCausalLM.from_pretrained(peftkit.model_path())
    with torch.no_grad():
        base = model(ids).logits
        model.load_adapter(adapter, adapter_name="mine")
        active = model.active_adapters()
        with_adapter = model(ids).logits
        model.disable_adapters()
        disabled = model(ids).logits
        model.enable_adapters()
        enabled = model(ids).logits
        auto = AutoModelForCausalLM.from_pretrained(adapter)(ids).logits
        model.delete_adapter("mine")
        deleted = model(ids).logits
        has_config_after_delete = hasattr(model, "peft_config")
        # a new adapter from a peftkit config, saved by transformers' save_pretrained (PEFT format)
        model.add_adapter(peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                          adapter_name="fresh")
        added = model(ids).logits
    model.save_pretrained(os.path.join(out, "added"))
    torch.save({"with_adapter": with_adapter, "auto": auto, "added": added}, os.path.join(out, "logits.pt"))
    return {"active": active, "adapter_effect": (with_adapter - base).abs().max().item(),
            "disabled_diff": (disabled - base).abs().max().item(), "enabled_diff": (enabled - with_adapter).abs().max().item(),
            "auto_diff": (auto - with_adapter).abs().max().item(), "deleted_diff": (deleted - base).abs().max().item(),
            "has_peft_config_after_delete": has_config_after_delete, "active_added": model.active_adapters()}


def case_lm_eval(out: str, adapter: str) -> dict:
    """lm-eval's HFLM around a peftkit PeftModel, on a local multiple-choice task (tests write its YAML)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    base, tok = peftkit.load_model()
    model = peftkit.PeftModel.from_pretrained(base, adapter)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    result = lm_eval.simple_evaluate(model=lm, tasks=["peftkit_e2e_mc"], task_manager=TaskManager(include_path=out),
                                     log_samples=True)
    samples = result["samples"]["peftkit_e2e_mc"]
    return {"acc": result["results"]["peftkit_e2e_mc"]["acc,none"],
            "loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples]}


def imported_peft() -> dict:
    peft = sys.modules.get("peft")
    real = [name for name, module in sys.modules.items() if (name == "peft" or name.startswith("peft."))
            and "site-packages/peft/" in str(getattr(module, "__file__", "") or "")]
    return {"peft_is_peftkit": peft is None or peft.PeftModel is peftkit.PeftModel, "real_peft_modules": real}


CASES = {"sft": case_sft, "dpo": case_dpo, "grpo": case_grpo, "hf_trainer": case_hf_trainer,
         "load_adapter": case_load_adapter, "lm_eval": case_lm_eval}

if __name__ == "__main__":
    torch.set_num_threads(1)
    name, out, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    result = CASES[name](out, arg)
    result.update(imported_peft())
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
