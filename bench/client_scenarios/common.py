"""Shared helpers: the bundled stories260k Llama stands in for the Hub's tiny test models."""
import json
import os

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "peftkit", "assets")
MODEL_DIR = os.path.join(ASSETS, "stories260k")
DATA_DIR = os.path.join(ASSETS, "data")
IDS = torch.LongTensor([[1, 5, 9, 20, 33, 7, 3, 11]])  # no 2: it is eos = pad, which transformers masks
torch.set_num_threads(1)


def base_model(cls=None, **kw):
    from transformers import AutoModelForCausalLM
    return (cls or AutoModelForCausalLM).from_pretrained(MODEL_DIR, **kw)


def tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def records(n, split="train"):
    with open(os.path.join(DATA_DIR, f"e2e_nlg_{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def has_tuner_layer(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def saved_lora_folder(path, seed=0, **cfg):
    """A PEFT LoRA adapter folder with non-zero weights, made with get_peft_model (the `peft` in use)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    kwargs.update(cfg)
    pm = get_peft_model(base_model(), LoraConfig(**kwargs))
    pm.save_pretrained(path)
    with torch.no_grad():
        logits = pm(IDS).logits
    return pm, logits
