"""Soft-prompt adapter folders cross-load between peftkit and Hugging Face PEFT with the same outputs.

For a grouped-query-attention decoder (tiny Llama, 4 heads / 2 KV heads), T5 and BERT, each
method is saved by one library and loaded by the other; logits and greedy generations must match.
Prompts and classifier heads hold non-zero values that change the output.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from peftkit.prompt_model import ENCODER_WEIGHTS_NAME  # noqa: E402

from .models import _tokens, tiny_bert_cls, tiny_llama, tiny_t5  # noqa: E402

MODELS = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
    "bert": (tiny_bert_cls, "SEQ_CLS"),
}
METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 12}),
    "ptuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM"}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_proj": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 10}),
}
N_VIRTUAL = 4


def inputs(task, batch=3):
    kw = {"input_ids": _tokens(batch, 6, 64, seed=5), "attention_mask": torch.ones(batch, 6, dtype=torch.long)}
    if task == "SEQ_2_SEQ_LM":
        kw["decoder_input_ids"] = _tokens(batch, 4, 64, seed=6)
    return kw


def logits(model, task):
    with torch.no_grad():
        return model(**inputs(task)).logits


def generations(model, task):
    kw = inputs(task)
    kw.pop("decoder_input_ids", None)
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=6, do_sample=False, pad_token_id=0)


def randomize_heads(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def check_same(a, b, task, base_out):
    la, lb = logits(a, task), logits(b, task)
    tail = la[:, -base_out.shape[1]:] if la.dim() == 3 else la
    assert not torch.allclose(tail, base_out, atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(la, lb, atol=2e-5, rtol=1e-4)
    if task != "SEQ_CLS":
        assert torch.equal(generations(a, task), generations(b, task))


@pytest.fixture(params=list(MODELS))
def model_case(request):
    return MODELS[request.param]


@pytest.mark.parametrize("method", list(METHODS))
def test_peftkit_folder_loads_in_hf(model_case, method, tmp_path):
    build, task = model_case
    cls_name, kw = METHODS[method]
    base = build()
    base_out = logits(base, task)
    pm = peftkit.get_peft_model(base, getattr(peftkit, cls_name)(task_type=task, num_virtual_tokens=N_VIRTUAL, **kw))
    randomize_heads(pm)
    pm.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    reparam = method in ("ptuning_mlp", "ptuning_lstm", "prefix_proj")
    assert (ENCODER_WEIGHTS_NAME in files) == reparam
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(build(), str(tmp_path))
    pm.eval()
    check_same(pm, hf, task, base_out)
    # same config keys and values as Hugging Face writes for this config
    ours = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = hf.peft_config["default"].to_dict()
    assert set(ours) == set(theirs)
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("method", list(METHODS))
def test_hf_folder_loads_in_peftkit(model_case, method, tmp_path):
    build, task = model_case
    cls_name, kw = METHODS[method]
    base = build()
    base_out = logits(base, task)
    hf_cfg = getattr(peft, cls_name)(task_type=task, num_virtual_tokens=N_VIRTUAL, **kw)
    hf = peft.get_peft_model(base, hf_cfg)
    randomize_heads(hf)
    hf.save_pretrained(str(tmp_path))
    hf.eval()
    pm = peftkit.PeftModel.from_pretrained(build(), tmp_path)
    assert isinstance(pm, peftkit.PeftModel)
    check_same(pm, hf, task, base_out)
    # the file written back by peftkit holds the same tensors
    out = tmp_path / "again"
    pm.save_pretrained(out)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gqa_prefix_shapes_match_hf():
    pm = peftkit.get_peft_model(tiny_llama(), peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    cfg = pm.peft_config["default"]
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.encoder_hidden_size) == (8, 2, 8)  # 2 KV heads of size 4
    assert tuple(pm.get_prompt_embedding_to_save("default").shape) == (5, 2 * 2 * 8)
    cache = pm.get_prompt(batch_size=3)
    assert tuple(cache.layers[0].keys.shape) == (3, 2, 5, 4)
