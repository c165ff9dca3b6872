"""The LM head and loss only at target positions, in chunks (peftkit.train.loss_head): the same loss
and gradients as the plain full-logits path, which models take which path and why, and packing by
default where it is exact."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import ConfigError, PeftkitError
from peftkit.train.collate import collate, length_grouped, pack
from peftkit.train.config import DataConfig, TrainConfig
from peftkit.train.data import IGNORE_INDEX, Example, bundled_data, prepare_data, read_records
from peftkit.train.loop import Trainer
from peftkit.train.loss_head import LossForward, LossHead, choose_loss_head, chunked_loss_sum, head_loss_sum
from peftkit.train.step import loss_sum
from tests.models import tiny_gpt2, tiny_llama


def _examples(vocab: int, seed: int = 0) -> list[Example]:
    """Six examples of varied length with a masked prompt (labels -100 on the first tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in ((9, 4), (5, 2), (12, 7), (3, 1), (8, 8), (7, 3)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(Example(input_ids=ids, labels=labels))
    return out


def _batches(vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    exs = _examples(vocab)
    return {"padded": collate(exs, 0, "CAUSAL_LM"), "packed": collate(pack(exs, 20), 0, "CAUSAL_LM")}


def _lora(model, std=0.1, **kw):
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights="gaussian",
                                                          **kw))
    with torch.no_grad():  # non-zero B: every adapter changes the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return pm


def _loss_and_grads(model, plan, batch):
    model.zero_grad(set_to_none=True)
    loss = LossForward(model, "CAUSAL_LM", plan)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(model, batch, chunk_rows=5):
    """Plain vs chunked (small chunks: several per batch): loss and every trainable gradient."""
    model.train()
    plan = choose_loss_head(model, "CAUSAL_LM")
    assert plan.path == "chunked", plan.reason
    plan.chunk_rows = chunk_rows
    full, gf = _loss_and_grads(model, LossHead("full", "reference"), batch)
    chunked, gc = _loss_and_grads(model, plan, batch)
    # the reference, written out: cross-entropy over the shifted labels that are not -100
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(full, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert gf.keys() == gc.keys() and gf
    for k in gf:
        # float tolerance: the sums run in another order (seen: 5e-6 on gradients of up to 19)
        torch.testing.assert_close(gc[k], gf[k], rtol=1e-4, atol=1e-6 * (1 + float(gf[k].abs().max())), msg=k)
    assert any(float(g.abs().sum()) > 0 for g in gc.values())


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_chunked_equals_full_lora_all_linear(make, layout):
    model = make()
    pm = _lora(model, target_modules="all-linear")
    _compare(pm, _batches(model.config.vocab_size)[layout])


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_equals_full_with_lora_on_lm_head(layout):
    model = tiny_llama()  # untied head
    pm = _lora(model, target_modules=["q_proj", "v_proj", "lm_head"])
    assert any("lm_head.lora_A" in n for n, _ in pm.named_parameters())
    _compare(pm, _batches(64)[layout])


def test_chunked_equals_full_with_modules_to_save_head():
    model = tiny_llama()
    pm = _lora(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert any("lm_head.modules_to_save" in n and p.requires_grad for n, p in pm.named_parameters())
    _compare(pm, _batches(64)["padded"])


def test_chunked_equals_full_with_trainable_tied_embeddings():
    """The bundled model ties lm_head to embed_tokens: the shared weight gets both gradients."""
    model, _ = peftkit.load_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    _compare(model, _batches(512)["padded"], chunk_rows=3)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_equals_full_on_the_bundled_model(layout):
    model, _ = peftkit.load_model()
    _compare(_lora(model, target_modules="all-linear"), _batches(512)[layout])


def test_no_target_position_gives_zero_loss_and_zero_gradients():
    pm = _lora(tiny_llama(), target_modules=["q_proj", "lm_head"])
    batch = collate(_examples(64)[:2], 0, "CAUSAL_LM")
    batch["labels"][:] = IGNORE_INDEX
    loss, grads = _loss_and_grads(pm, choose_loss_head(pm, "CAUSAL_LM"), batch)
    assert float(loss) == 0.0 and all(float(g.abs().sum()) == 0 for g in grads.values())


def test_head_loss_sum_without_grad_matches_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    h, y = torch.randn(23, 8), torch.randint(0, 11, (23,))
    with torch.no_grad():
        got = head_loss_sum(h, y, head, chunk_rows=4)
        want = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    torch.testing.assert_close(got, want)


def test_chunked_under_bf16_autocast_matches_full():
    model, _ = peftkit.load_model()
    pm = _lora(model, target_modules="all-linear")
    batch = _batches(512)["padded"]
    plan = choose_loss_head(pm, "CAUSAL_LM")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = loss_sum(pm, batch, "CAUSAL_LM")[0]
        chunked = chunked_loss_sum(plan, batch)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=1e-2, atol=1e-2)


# -- which path, and why -------------------------------------------------------------------------


def test_soft_capped_or_scaled_logits_take_the_full_path():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    plan = choose_loss_head(_lora(model, target_modules=["q_proj"]), "CAUSAL_LM")
    assert plan.path == "full" and "final_logit_softcapping" in plan.reason
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        choose_loss_head(model, "CAUSAL_LM", mode="chunked")


def test_a_model_whose_logits_are_not_the_head_of_the_body_takes_the_full_path():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    base = tiny_llama()
    model = Scaled(base.config)
    model.load_state_dict(base.state_dict())
    plan = choose_loss_head(model, "CAUSAL_LM")
    assert plan.path == "full" and "not lm_head(last hidden state)" in plan.reason


def test_prompt_learning_and_other_tasks_take_the_full_path():
    pm = peftkit.get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    plan = choose_loss_head(pm, "CAUSAL_LM")
    assert plan.path == "full" and "virtual tokens" in plan.reason
    assert "SEQ_CLS" in choose_loss_head(tiny_llama(), "SEQ_CLS").reason
    assert choose_loss_head(tiny_llama(), "CAUSAL_LM", mode="full").describe().startswith("full logits")
    with pytest.raises(ConfigError, match="loss_head must be one of"):
        choose_loss_head(tiny_llama(), "CAUSAL_LM", mode="fast")


def test_chunk_rows_follow_the_vocabulary():
    from peftkit.train.loss_head import chunk_rows_for

    assert chunk_rows_for(32000) == 524 and chunk_rows_for(512) == 8192 and chunk_rows_for(10**7) == 256


# -- through the Trainer and `peftkit train` ------------------------------------------------------


@pytest.fixture(scope="module")
def instruction_data(tok):
    """Instruction records (the prompt masked from the loss) from the bundled E2E data."""
    recs = [{"instruction": "Describe the restaurant.", "input": r["source"], "output": r["target"]}
            for r in read_records(bundled_data()[0])[:40]]
    return prepare_data(DataConfig(eval_fraction=0, max_length=192), tok, lambda f: "CAUSAL_LM",
                        train_source=recs[:32], eval_source=recs[32:40])


def _trainer(tok, data, **kw):
    model, _ = peftkit.load_model()
    pm = _lora(model, std=0.01, target_modules="all-linear")
    packing, max_length = kw.pop("packing", False), kw.pop("max_length", 256)
    settings = dict(progress=False, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                    batch_size=8, micro_batch_size=4, max_steps=3, lr=1e-2, seed=0)
    cfg = TrainConfig(**{**settings, **kw})
    return Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", quiet=True, packing=packing,
                   max_length=max_length)


def test_trainer_chunked_and_full_give_the_same_training(tok, instruction_data):
    assert all(ex.labels[0] == IGNORE_INDEX for ex in instruction_data.train.examples)  # the prompt is masked
    full = _trainer(tok, instruction_data, loss_head="full")
    chunked = _trainer(tok, instruction_data, loss_head="auto")
    assert full.loss_head.path == "full" and chunked.loss_head.path == "chunked"
    assert chunked.start_report()["loss head"].startswith("chunked")
    chunked_before = chunked.run_eval("before")["eval_loss"]
    for t in (full, chunked):
        t.optimizer = torch.optim.SGD(t.params, lr=0.1)  # SGD: see test_accumulation_equals_one_big_batch
    first = [t.train_step(t.micro_batches(0)) for t in (full, chunked)]
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    for n, p in chunked.model.named_parameters():  # one step: the same update to float rounding
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=1e-4, atol=1e-6)
    later = [[t.train_step(t.micro_batches(s)) for s in (1, 2)] for t in (full, chunked)]
    assert later[0] == pytest.approx(later[1], rel=1e-5)
    ev = [t.run_eval("after")["eval_loss"] for t in (full, chunked)]
    assert ev[0] == pytest.approx(ev[1], rel=1e-5) and ev[0] < chunked_before


def test_peftkit_train_reports_its_choices_and_matches_the_full_path(tmp_path):
    import json

    import yaml

    from peftkit.cli import main

    flags = ["--data", bundled_data()[0], "--eval-data", bundled_data()[1], "--max-steps", "4", "--batch-size", "4",
             "--r", "4", "--eval-steps", "0", "--save-steps", "0", "--eval-generate-samples", "0",
             "--num-generations", "0", "--max-eval-samples", "16", "--max-length", "128", "--no-progress"]
    assert main(["train", "--output-dir", str(tmp_path / "auto"), *flags]) == 0
    assert main(["train", "--output-dir", str(tmp_path / "full"), "--loss-head", "full", *flags]) == 0
    files = {name: yaml.safe_load((tmp_path / name / "run.yaml").read_text()) for name in ("auto", "full")}
    assert files["auto"]["data"]["packing"] is True  # none (auto) resolved
    runs = {name: files[name]["resolved"] for name in ("auto", "full")}
    assert runs["auto"]["loss_head"].startswith("chunked") and runs["full"]["loss_head"].startswith("full logits")
    assert runs["auto"]["batching"].startswith("packed rows")  # the default packs: the model keeps examples apart
    ev = [[json.loads(x) for x in open(tmp_path / n / "metrics.jsonl")][-1]["eval_loss"] for n in ("auto", "full")]
    assert ev[0] == pytest.approx(ev[1], rel=1e-4)  # AdamW, 4 steps: equal to float tolerance


# -- packing by default ---------------------------------------------------------------------------


def test_packing_is_the_default_where_exact(tok, instruction_data):
    t = _trainer(tok, instruction_data, packing=None, batch_size=2, micro_batch_size=None, max_length=512)
    assert t.packed and len(t.units) < len(instruction_data.train) and t.batching.startswith("packed rows")
    off = _trainer(tok, instruction_data, packing=False)
    assert not off.packed and not off.group_by_length and "packing off" in off.batching
    assert DataConfig().packing is None


def test_without_exact_packing_the_default_groups_padded_batches_by_length(tok, instruction_data, monkeypatch):
    import peftkit.train.loop as loop

    monkeypatch.setattr(loop, "check_packing", lambda *a, **k: "the model lets packed examples attend to each other")
    t = _trainer(tok, instruction_data, packing=None)
    assert not t.packed and t.group_by_length and "grouped by length" in t.batching and "attend" in t.batching
    with pytest.raises(PeftkitError, match="not safe"):
        _trainer(tok, instruction_data, packing=True)
    lengths = [len(u.input_ids) for u in t.units]
    order = t._order(0)
    assert sorted(order) == list(range(len(t.units)))
    # each global batch of 8 is a run of the length-sorted order: less padding than random batches
    pad = sum(max(lengths[i] for i in order[k:k + 8]) * 8 for k in range(0, 32, 8))
    randomly = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    pad_random = sum(max(lengths[i] for i in randomly[k:k + 8]) * 8 for k in range(0, 32, 8))
    assert pad < pad_random


def test_length_grouped_sorts_within_megabatches_and_keeps_a_partial_batch_last():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    g = torch.Generator().manual_seed(0)
    out = length_grouped(list(range(11)), lengths, batch_size=2, generator=g, megabatch=2)
    assert sorted(out) == list(range(11)) and out[-1] == 8  # the incomplete last batch (the shortest) stays last
    batches = [out[k:k + 2] for k in range(0, 10, 2)]
    first_mega = {i for b in batches[:2] for i in b}
    assert first_mega == {0, 1, 2, 3}  # megabatches never mix
    for b in batches:
        assert lengths[b[0]] >= lengths[b[1]]


def test_cli_flags_of_the_new_settings():
    from peftkit.cli import _nest, build_train_parser

    parser = build_train_parser("lora")
    assert _nest(parser.parse_args(["--loss-head", "full", "--no-packing"]))["train"]["loss_head"] == "full"
    assert _nest(parser.parse_args(["--no-packing"]))["data"]["packing"] is False
    assert _nest(parser.parse_args(["--packing"]))["data"]["packing"] is True
    assert "packing" not in (_nest(parser.parse_args([])).get("data") or {})
