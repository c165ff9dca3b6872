"""Soft-prompt methods: prompt tuning, P-tuning, prefix tuning / P-tuning v2 (see peftkit.prompt_model).

Training on the bundled pretrained Llama (GQA: 8 heads, 4 KV heads), initialisation, generation
with left padding and beams, gradient checkpointing, mixed-adapter batches across methods and
prompt lengths, resumable checkpoints, nearest tokens, and the errors for bad input.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit import (
    CheckpointError,
    ConfigError,
    PeftkitError,
    PeftkitWarning,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    p_tuning_v2_config,
)
from peftkit.prompt_model import ENCODER_WEIGHTS_NAME, PromptLearningModel, PromptModelForCausalLM

from .models import _tokens, tiny_bart, tiny_bert_cls, tiny_llama, tiny_t5

STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "One day, a big dog came to the park. The dog was very happy and wanted to play.",
    "Tom had a red ball. He threw the ball to his friend Sue, and she laughed.",
    "The sun was hot, so the cat slept under the tree all day long.",
]

METHODS = {
    "prompt_text": lambda tok: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                  prompt_tuning_init_text="Once upon a time",
                                                  tokenizer_name_or_path=tok),
    "prompt_vocab": lambda tok: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                                   prompt_tuning_init="SAMPLE_VOCAB"),
    "ptuning_mlp": lambda tok: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32),
    "ptuning_lstm": lambda tok: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                                    encoder_reparameterization_type="LSTM", encoder_hidden_size=32),
    "prefix_proj": lambda tok: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True,
                                                  encoder_hidden_size=32),
    "p_tuning_v2": lambda tok: p_tuning_v2_config(8, task_type="CAUSAL_LM"),
}


@pytest.fixture(scope="module")
def stories_model():
    model, tok = peftkit.load_model()
    return model.eval(), tok


def fresh(stories_model):
    return copy.deepcopy(stories_model[0])


def lm_batch(tok):
    tok.pad_token = tok.unk_token
    tok.padding_side = "right"
    enc = tok(STORIES, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def train_steps(pm, batch, steps, lr=0.05):
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pm.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_goes_down_on_bundled_model(stories_model, method):
    tok_path = str(peftkit.model_path())
    pm = get_peft_model(fresh(stories_model), METHODS[method](tok_path))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in pm.base_model.named_parameters()}
    batch = lm_batch(stories_model[1])
    losses = train_steps(pm, batch, 12)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in pm.base_model.named_parameters())


def test_virtual_tokens_are_masked_from_the_loss(stories_model):
    pm = get_peft_model(fresh(stories_model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    batch = lm_batch(stories_model[1])
    out = pm(**batch)
    assert out.logits.shape[1] == 5 + batch["input_ids"].shape[1]
    # by hand: the last virtual position predicts the first text token; virtual tokens are never targets
    logits = out.logits[:, 4:-1]
    target = batch["labels"]
    ref = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_classifier_and_seq2seq_train_prompt_and_head():
    pm = get_peft_model(tiny_bert_cls(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    out = pm(input_ids=_tokens(4, 6, 64), labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    assert all(pm.get_parameter(n).grad is not None for n in trainable)
    t5 = get_peft_model(tiny_t5(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    assert tuple(t5.get_prompt_embedding_to_save("default").shape) == (6, 16)  # encoder + decoder halves, as HF
    out = t5(input_ids=_tokens(2, 6, 64), labels=_tokens(2, 4, 64, seed=2))
    out.loss.backward()
    assert t5.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


def test_token_classification_labels_and_features():
    from transformers import BertConfig, BertForTokenClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pm = get_peft_model(BertForTokenClassification(cfg).eval(),
                        PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2))
    out = pm(input_ids=_tokens(2, 5, 64), labels=torch.zeros(2, 5, dtype=torch.long))  # labels extended with -100
    assert out.logits.shape == (2, 7, 3) and torch.isfinite(out.loss)
    fe = get_peft_model(BertModel(cfg).eval(), PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=2))
    assert fe(input_ids=_tokens(2, 5, 64)).last_hidden_state.shape == (2, 7, 16)


# ---------------------------------------------------------------------------------------------
# initialisation


def test_text_init_equals_token_embeddings(stories_model):
    model, tok = stories_model
    path = str(peftkit.model_path())
    text = "Once upon a time"
    ids = tok(text)["input_ids"]
    emb = model.get_input_embeddings().weight.detach()
    for n in (2 * len(ids) + 1, 2):  # repeated, truncated
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                 prompt_tuning_init_text=text, tokenizer_name_or_path=path)
        pm = get_peft_model(fresh(stories_model), cfg)
        want = emb[torch.tensor((ids * n)[:n])]
        assert torch.equal(pm.prompt_encoder["default"].embedding.weight.detach(), want)


def test_sample_vocab_init_uses_vocabulary_rows(stories_model):
    pm = get_peft_model(fresh(stories_model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                                 prompt_tuning_init="SAMPLE_VOCAB"))
    emb = pm.word_embeddings.weight.detach()
    for row in pm.prompt_encoder["default"].embedding.weight.detach():
        assert (emb == row).all(dim=1).any()


def test_nearest_tokens_of_text_init(stories_model):
    model, tok = stories_model
    path = str(peftkit.model_path())
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="Once upon a time", tokenizer_name_or_path=path)
    pm = get_peft_model(fresh(stories_model), cfg)
    near = pm.nearest_tokens(k=3)
    ids = tok("Once upon a time")["input_ids"][:4]
    assert len(near) == 4 and all(len(row) == 3 for row in near)
    assert [row[0].token_id for row in near] == ids
    assert all(abs(row[0].score - 1.0) < 1e-5 and row[0].score >= row[1].score >= row[2].score for row in near)
    assert [row[0].token for row in near] == tok.convert_ids_to_tokens(ids)
    pm.add_adapter("pre", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(PeftkitError, match="keys and values"):
        pm.nearest_tokens("pre")


# ---------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("method", ["prompt_vocab", "ptuning_lstm", "p_tuning_v2", "prefix_proj"])
def test_left_padded_batch_generates_like_one_by_one(stories_model, method):
    model, tok = stories_model
    torch.manual_seed(0)
    pm = get_peft_model(fresh(stories_model), METHODS[method](None)).eval()
    prompts = ["Once upon a time", "The little dog saw a big red", "Tom"]
    tok.pad_token = tok.unk_token
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()
    gen = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    batched = pm.generate(**enc, **gen)
    L = enc["input_ids"].shape[1]
    for i, text in enumerate(prompts):
        one = tok(text, return_tensors="pt")
        alone = pm.generate(**one, **gen)
        assert torch.equal(batched[i, L:], alone[0, one["input_ids"].shape[1]:]), text
    with pm.disable_adapter():
        base = pm.generate(**enc, **gen)
    assert not torch.equal(base, batched)


def test_generate_with_beams_and_several_sequences(stories_model):
    pm = get_peft_model(fresh(stories_model), p_tuning_v2_config(4, task_type="CAUSAL_LM"))
    pm.add_adapter("pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    ids = _tokens(2, 5, 512)
    gen = {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    mixed = pm.generate(input_ids=ids, adapter_names=["default", "pt"], **gen)
    assert mixed.shape == (4, 10)
    for i, name in enumerate(["default", "pt"]):
        pm.set_adapter(name)
        assert torch.equal(mixed[2 * i:2 * i + 2], pm.generate(input_ids=ids[i:i + 1], **gen))


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def test_gradient_checkpointing_with_prompt_tuning(stories_model):
    batch = lm_batch(stories_model[1])
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        pm = get_peft_model(fresh(stories_model), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        if gc:
            pm.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        pm.train()
        loss = pm(**batch).loss
        loss.backward()
        grads = [p.grad.clone() for p in pm.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_with_prefix_tuning_raises(stories_model):
    model = fresh(stories_model)
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.activation_checkpointing_enable()
    pm.train()
    with pytest.raises(PeftkitError, match="gradient checkpointing"):
        pm(**lm_batch(stories_model[1]))
    pm.eval()  # inference is fine: checkpointing is inactive in eval mode
    pm.generate(input_ids=_tokens(1, 4, 512), max_new_tokens=2)
    other = fresh(stories_model)
    other.activation_checkpointing_enable()
    with pytest.raises(PeftkitError, match="gradient checkpointing"):
        get_peft_model(other, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


# ---------------------------------------------------------------------------------------------
# several adapters, mixed batches


def multi(build, task, heads=True):
    pm = get_peft_model(build(), PromptTuningConfig(task_type=task, num_virtual_tokens=3), adapter_name="pt")
    pm.add_adapter("pre", PrefixTuningConfig(task_type=task, num_virtual_tokens=5))
    pm.add_adapter("ptun", PromptEncoderConfig(task_type=task, num_virtual_tokens=2))
    pm.add_adapter("proj", PrefixTuningConfig(task_type=task, num_virtual_tokens=2, prefix_projection=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g))
    return pm.eval()


ROWS = ["pt", "pre", "__base__", "ptun", "proj", "pt"]


def single(pm, name, **row):
    if name == "__base__":
        with pm.disable_adapter():
            return pm(**row)
    pm.set_adapter(name)
    return pm(**row)


@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_mixed_batch_equals_single_adapter_runs(kind):
    build, task = {"llama": (tiny_llama, "CAUSAL_LM"), "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
                   "bert": (tiny_bert_cls, "SEQ_CLS")}[kind]
    pm = multi(build, task)
    B = len(ROWS)
    kw = {"input_ids": _tokens(B, 6, 64), "attention_mask": torch.ones(B, 6, dtype=torch.long)}
    if task == "SEQ_2_SEQ_LM":
        kw["decoder_input_ids"] = _tokens(B, 4, 64, seed=4)
    with torch.no_grad():
        mixed = pm(**kw, adapter_names=ROWS).logits
        outs = []
        for i, name in enumerate(ROWS):
            alone = single(pm, name, **{k: v[i:i + 1] for k, v in kw.items()}).logits
            outs.append(alone)
            got = mixed[i:i + 1, -alone.shape[1]:] if alone.dim() == 3 else mixed[i:i + 1]
            torch.testing.assert_close(got, alone, atol=2e-6, rtol=1e-5)
    assert len({round(o[..., -1].sum().item(), 4) for o in outs}) >= 4  # the adapters really differ
    if task == "SEQ_CLS":
        return
    gk = {k: v for k, v in kw.items() if k != "decoder_input_ids"}
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = pm.generate(**gk, adapter_names=ROWS, **gen)
        for i, name in enumerate(ROWS):
            row = {k: v[i:i + 1] for k, v in gk.items()}
            if name == "__base__":
                with pm.disable_adapter():
                    alone = pm.generate(**row, **gen)
            else:
                pm.set_adapter(name)
                alone = pm.generate(**row, **gen)
            assert torch.equal(mixed[i:i + 1, :alone.shape[1]], alone), name


def test_mixed_batch_per_token_outputs_of_an_encoder():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pm = multi(lambda: BertForTokenClassification(cfg).eval(), "TOKEN_CLS")
    ids = _tokens(len(ROWS), 5, 64)
    mixed = pm(input_ids=ids, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        alone = single(pm, name, input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1, -alone.shape[1]:], alone, atol=2e-6, rtol=1e-5)


def test_bart_mixed_prompt_lengths_and_the_prefix_limit():
    """BART counts positions from 0 (encoder) and from the cache length (decoder): encoder prompts of
    different lengths batch exactly; decoder prefixes of different lengths are refused clearly."""
    pm = get_peft_model(tiny_bart(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    pm.add_adapter("short", PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    pm.eval()
    rows = ["default", "short", "__base__"]
    ids, dec = _tokens(3, 6, 64), _tokens(3, 4, 64, seed=2)
    with torch.no_grad():
        mixed = pm(input_ids=ids, decoder_input_ids=dec, adapter_names=rows).logits
        gen = pm.generate(input_ids=ids, adapter_names=rows, max_new_tokens=4, do_sample=False)
        for i, name in enumerate(rows):
            alone = single(pm, name, input_ids=ids[i:i + 1], decoder_input_ids=dec[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=2e-6, rtol=1e-5)
            if name == "__base__":
                with pm.disable_adapter():
                    g = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
            else:
                g = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
            assert torch.equal(gen[i:i + 1, :g.shape[1]], g)
    pm.add_adapter("pre", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    with pytest.raises(PeftkitError, match="prefixes of different lengths"):
        pm(input_ids=ids, decoder_input_ids=dec, adapter_names=["pre", "pre", "__base__"])


def test_set_adapter_switches_and_disable_gives_base():
    pm = multi(tiny_llama, "CAUSAL_LM")
    ids = _tokens(2, 6, 64)
    with torch.no_grad():
        with pm.disable_adapter():
            base = pm(input_ids=ids).logits
        ref = tiny_llama()(input_ids=ids).logits
        assert torch.equal(base, ref)
        seen = []
        for name in ("pt", "pre", "ptun", "proj"):
            pm.set_adapter(name)
            assert pm.active_adapter == name
            trainable = {n.split(".")[1] for n, p in pm.named_parameters() if p.requires_grad}
            assert trainable == {name}
            seen.append(pm(input_ids=ids).logits[:, -6:])
    assert all(not torch.allclose(a, b, atol=1e-4) for i, a in enumerate(seen) for b in seen[i + 1:])
    pm.delete_adapter("pre")
    assert "pre" not in pm.prompt_encoder and "pre" not in pm.peft_config
    with pytest.raises(PeftkitError):
        pm(input_ids=ids, adapter_names=["pre", "pt"])


def test_adapters_with_heads_are_independent_and_deletable():
    pm = multi(tiny_bert_cls, "SEQ_CLS")
    head = pm.base_model.classifier
    assert set(head.modules_to_save) == {"pt", "pre", "ptun", "proj"}
    for name in ("pt", "pre", "ptun", "proj"):
        pm.delete_adapter(name) if name != "proj" else None
    assert set(head.modules_to_save) == {"proj"}


# ---------------------------------------------------------------------------------------------
# saving, loading, resuming


def test_save_load_several_adapters(tmp_path):
    pm = multi(tiny_bert_cls, "SEQ_CLS")
    ids = _tokens(3, 6, 64)
    with torch.no_grad():
        refs = {n: single(pm, n, input_ids=ids).logits for n in ("pt", "pre", "ptun", "proj")}
    pm.save_pretrained(tmp_path)
    for name in ("pre", "ptun", "proj"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "pt", adapter_name="pt")
    for name in ("pre", "ptun", "proj"):
        loaded.load_adapter(tmp_path / name, name)
    assert isinstance(loaded, PromptLearningModel)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        for name, ref in refs.items():
            assert torch.equal(single(loaded, name, input_ids=ids).logits, ref), name
        mixed = loaded(input_ids=ids, adapter_names=["proj", "pt", "pre"]).logits
    torch.testing.assert_close(mixed, torch.cat([refs["proj"][:1], refs["pt"][1:2], refs["pre"][2:]]))


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm", "prefix_proj"])
def test_training_resumes_exactly_from_a_folder(stories_model, method, tmp_path):
    batch = lm_batch(stories_model[1])
    pm = get_peft_model(fresh(stories_model), METHODS[method](None))
    train_steps(pm, batch, 2)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / ENCODER_WEIGHTS_NAME).is_file()
    resumed = PeftModel.from_pretrained(fresh(stories_model), tmp_path, is_trainable=True)
    a, b = pm.prompt_encoder["default"].state_dict(), resumed.prompt_encoder["default"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for model in (pm, resumed):  # the next step is the same step
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
    ga = [p.grad for p in pm.parameters() if p.requires_grad]
    gb = [p.grad for p in resumed.parameters() if p.requires_grad]
    assert len(ga) == len(gb) > 1 and all(torch.equal(x, y) for x, y in zip(ga, gb))

    # the compatible file alone: inference gives the same outputs; training continues on the saved prompt
    os.remove(tmp_path / ENCODER_WEIGHTS_NAME)
    pm.eval()
    ids = _tokens(2, 6, 512)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        inference = PeftModel.from_pretrained(fresh(stories_model), tmp_path)
        torch.testing.assert_close(inference(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
    with pytest.warns(PeftkitWarning, match=f"no {ENCODER_WEIGHTS_NAME}"):
        direct = PeftModel.from_pretrained(fresh(stories_model), tmp_path, is_trainable=True)
    assert [n for n, p in direct.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    with torch.no_grad():
        torch.testing.assert_close(direct(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_several_reparameterized_adapters_resume_from_one_folder(stories_model, tmp_path):
    pm = get_peft_model(fresh(stories_model), METHODS["ptuning_mlp"](None))
    pm.add_adapter("b", METHODS["prefix_proj"](None))
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "b" / ENCODER_WEIGHTS_NAME).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftkitWarning)
        loaded = PeftModel.from_pretrained(fresh(stories_model), tmp_path, is_trainable=True)
        loaded.load_adapter(tmp_path, "b", is_trainable=True, subfolder="b")
    for name in ("default", "b"):
        a, b = pm.prompt_encoder[name].state_dict(), loaded.prompt_encoder[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stale_encoder_file_is_not_used(stories_model, tmp_path):
    pm = get_peft_model(fresh(stories_model), METHODS["ptuning_mlp"](None))
    pm.save_pretrained(tmp_path)
    other = get_peft_model(fresh(stories_model), METHODS["ptuning_mlp"](None))
    other.save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / ENCODER_WEIGHTS_NAME, tmp_path / ENCODER_WEIGHTS_NAME)
    with pytest.warns(PeftkitWarning, match="does not reproduce"):
        loaded = PeftModel.from_pretrained(fresh(stories_model), tmp_path, is_trainable=True)
    ids = _tokens(1, 5, 512)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_loading_a_mismatched_file_fails_cleanly(tmp_path):
    import shutil

    pm = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.save_pretrained(tmp_path / "four")
    get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)).save_pretrained(
        tmp_path / "bad")
    shutil.copy(tmp_path / "four" / "adapter_config.json", tmp_path / "bad" / "adapter_config.json")
    with pytest.raises(CheckpointError, match="shape"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "bad")
    with pytest.raises(CheckpointError, match="shape"):
        pm.load_adapter(tmp_path / "bad", "bad")
    assert "bad" not in pm.peft_config and "bad" not in pm.prompt_encoder  # no trace of the failed load
    with pytest.raises(CheckpointError, match="prompt_embeddings"):
        peftkit.set_peft_model_state_dict(pm, {"other": torch.zeros(1)}, "default")
    with pytest.raises(PeftkitError, match="merged"):
        pm.merge_and_unload()
    assert pm.unload() is pm.base_model


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_configs_raise():
    for n in (0, -3, 2.5):  # None is allowed until the config is used (tests/test_peft_parity.py)
        with pytest.raises(ConfigError, match="num_virtual_tokens"):
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    for text in ("", "   ", None):
        with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
            PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                               tokenizer_name_or_path="x")
    with pytest.raises(ConfigError, match="prompt_tuning_init"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS")
    with pytest.raises(ConfigError, match="encoder_reparameterization_type"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ConfigError, match="encoder_dropout"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_dropout=1.5)
    with pytest.raises(ConfigError, match="init_weights"):
        PrefixTuningConfig(num_virtual_tokens=4, init_weights="ones")
    qa = PrefixTuningConfig(num_virtual_tokens=4, task_type="QUESTION_ANS")  # a config may say so (as HF PEFT) ...
    with pytest.raises(ConfigError, match="QUESTION_ANS"):
        get_peft_model(tiny_llama(), qa)  # ... a model cannot be built from it
    with pytest.raises(ConfigError, match="task_type"):
        get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="prefix projection"):
        p_tuning_v2_config(4, prefix_projection=True)


def test_text_init_with_a_missing_tokenizer_or_empty_tokens(tmp_path):
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="hi", tokenizer_name_or_path=str(tmp_path / "nowhere"))
    model = tiny_llama()
    with pytest.raises(PeftkitError, match="tokenizer"):
        get_peft_model(model, cfg)
    assert not any(isinstance(m, nn.ModuleDict) for m in model.modules())  # model unchanged


def test_model_without_input_embeddings_raises():
    from transformers import LlamaConfig

    class NoEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
            self.proj = nn.Linear(16, 16)

        def forward(self, inputs_embeds=None, **kwargs):
            return self.proj(inputs_embeds)

    with pytest.raises(PeftkitError, match="no input embedding"):
        get_peft_model(NoEmbeddings(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_prefix_tuning_on_attention_without_cache_raises():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(dim=16, hidden_dim=32, n_layers=2, n_heads=4, vocab_size=64, num_labels=2)
    model = DistilBertForSequenceClassification(cfg)
    with pytest.raises(PeftkitError, match="cache"):
        get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    pm = get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))  # input prompts work
    assert pm(input_ids=_tokens(2, 5, 64)).logits.shape == (2, 2)


def test_bad_runtime_input_raises():
    pm = multi(tiny_llama, "CAUSAL_LM")
    ids = _tokens(2, 5, 64)
    with pytest.raises(PeftkitError, match="one name per row"):
        pm(input_ids=ids, adapter_names=["pt"])
    with pytest.raises(PeftkitError, match="Unknown adapter"):
        pm(input_ids=ids, adapter_names=["pt", "nope"])
    with pytest.raises(PeftkitError, match="one soft-prompt adapter"):
        pm.set_adapter(["pt", "pre"])
    with pytest.raises(ConfigError):
        pm.add_adapter("lora", peftkit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(PeftkitError, match="needs input_ids"):
        pm.generate(inputs_embeds=torch.zeros(1, 2, 16))
    with pytest.raises(ConfigError, match="heads"):
        pm.add_adapter("bad", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=16,
                                                 num_attention_heads=4))


def test_classes_and_config_round_trip(tmp_path):
    pm = get_peft_model(tiny_llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert isinstance(pm, PromptModelForCausalLM) and isinstance(pm, peftkit.PeftModelForCausalLM)
    assert pm.base_model.__class__.__name__ == "LlamaForCausalLM"  # the raw model, as Hugging Face PEFT
    pm.save_pretrained(tmp_path)
    cfg = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, PromptEncoderConfig) and cfg.inference_mode and cfg.token_dim == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = peftkit.PeftModelForCausalLM.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded, PromptModelForCausalLM)
    assert "mlp_head" not in dict(loaded.prompt_encoder["default"].named_children())  # encoded form for inference
