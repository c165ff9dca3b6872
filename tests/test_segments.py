"""Attention per packed example (peftkit.train.segments): the same outputs and gradients as
transformers' masked packed rows, which models take it and why, and the training runs that use it
(gradient checkpointing, resume) computing what the masked road computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import peftkit
from peftkit.errors import ConfigError, PeftkitError
from peftkit.train.collate import collate, pack
from peftkit.train.config import TrainConfig
from peftkit.train.data import IGNORE_INDEX, Example
from peftkit.train.loop import Trainer
from peftkit.train.segments import SEGMENTS, choose_segments, register, segment_attention, segment_lengths
from tests.models import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")


class _Attn(torch.nn.Module):
    is_causal = True


def _masked_reference(q, k, v, segments, window=None):
    """SDPA over each whole row with the block-diagonal causal mask (what transformers builds)."""
    outs = []
    for b, lengths in enumerate(segments):
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        pos = torch.cat([torch.arange(n) for n in lengths])
        mask = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])
        if window is not None:
            mask &= pos[None, :] > pos[:, None] - window
        rep = q.shape[1] // k.shape[1]
        kb, vb = k[b:b + 1].repeat_interleave(rep, 1), v[b:b + 1].repeat_interleave(rep, 1)
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], kb, vb, attn_mask=mask, scale=0.3))
    return torch.cat(outs).transpose(1, 2)


@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (4, 3)], ids=["mha", "gqa", "window"])
def test_segment_attention_equals_the_masked_row_with_gradients(kv_heads, window):
    torch.manual_seed(0)
    segments = ((5, 1, 7, 3), (16,))
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k = torch.randn(2, kv_heads, 16, 8, requires_grad=True)
    v = torch.randn(2, kv_heads, 16, 8, requires_grad=True)
    kwargs = {SEGMENTS: segments} if window is None else {SEGMENTS: segments, "sliding_window": window}
    got, weights = segment_attention(_Attn(), q, k, v, None, scaling=0.3, **kwargs)
    want = _masked_reference(q, k, v, segments, window)
    assert weights is None and got.shape == (2, 16, 4, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(got)
    g1 = torch.autograd.grad(got, (q, k, v), grad)
    g2 = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segment_attention_refuses_what_it_cannot_compute():
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(PeftkitError, match="do not cover"):
        segment_attention(_Attn(), q, q, q, None, **{SEGMENTS: ((2, 3),)})
    with pytest.raises(PeftkitError, match="softcap"):
        segment_attention(_Attn(), q, q, q, None, softcap=30.0, **{SEGMENTS: ((6,),)})
    encoder = _Attn()
    encoder.is_causal = False
    with pytest.raises(PeftkitError, match="non-causal"):
        segment_attention(encoder, q, q, q, None, **{SEGMENTS: ((6,),)})


def test_without_segments_it_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[0, ..., 0] = False
    got, _ = segment_attention(_Attn(), q, k, v, mask, scaling=0.5)
    want, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(got, want)


def test_segment_lengths_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7], [3, 4, 0, 1, 2, 0, 1, 2]])
    assert segment_lengths(pos) == ((3, 2, 1, 2), (8,), (2, 3, 3))
    rows = pack([Example(input_ids=[5] * n, labels=[5] * n) for n in (4, 6, 3)], 8)
    batch = collate(rows, 0, "CAUSAL_LM")  # rows padded to one width: the tail restarts at 0
    assert all(sum(r) == batch["input_ids"].shape[1] for r in segment_lengths(batch["position_ids"]))


def _packed_batch(vocab):
    g = torch.Generator().manual_seed(0)
    exs = []
    for n, prompt in ((9, 4), (5, 2), (12, 7), (3, 1), (8, 8), (7, 3)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        exs.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(pack(exs, 20), 0, "CAUSAL_LM")


def _lora(model):
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                                          init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pm


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, lambda: peftkit.load_model()[0]],
                         ids=["llama", "gpt2", "bundled"])
def test_a_packed_forward_and_backward_equal_the_masked_rows(make):
    pm = _lora(make())
    base = pm.get_base_model()
    plan = choose_segments(base, "auto", True, False, CPU)
    assert plan.enabled, plan.reason
    batch = _packed_batch(base.config.vocab_size)
    assert any(len(r) > 2 for r in segment_lengths(batch["position_ids"]))

    def run(segmented):
        pm.zero_grad(set_to_none=True)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if segmented:
            inputs[SEGMENTS] = segment_lengths(batch["position_ids"])
        with plan.active() if segmented else torch.enable_grad():
            logits = pm(**inputs, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
            loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    pm.train()
    masked, gm = run(False)
    segmented, gs = run(True)
    assert base.config._attn_implementation == "sdpa"  # restored after the step
    torch.testing.assert_close(segmented, masked, rtol=1e-4, atol=1e-4)  # float rounding: logits of up to ~10
    for n in gm:
        torch.testing.assert_close(gs[n], gm[n], rtol=1e-3, atol=1e-5 * (1 + float(gm[n].abs().max())), msg=lambda m: f"{n}: {m}")


def test_which_models_take_it_and_why():
    llama = tiny_llama()
    assert choose_segments(llama, "auto", True, False, CPU).enabled
    assert choose_segments(llama, "mask", True, False, CPU).describe() == "masked rows: packed_attention mask"
    assert "not packed" in choose_segments(llama, "auto", False, False, CPU).reason
    assert "recompile" in choose_segments(llama, "auto", True, True, CPU).reason
    assert "CPU only" in choose_segments(llama, "auto", True, False, torch.device("cuda")).reason
    llama.set_attn_implementation("eager")
    plan = choose_segments(llama, "auto", True, False, CPU)
    assert not plan.enabled and "'eager', not sdpa" in plan.reason
    with pytest.raises(ConfigError, match="segments does not apply.*eager"):
        choose_segments(llama, "segments", True, False, CPU)
    with pytest.raises(ConfigError, match="must be one of"):
        choose_segments(llama, "on", True, False, CPU)


def test_a_model_that_drops_the_keyword_is_refused():
    class Dropping(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, position_ids=None, use_cache=None, **kwargs):
            return super().forward(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)

    cfg = tiny_llama().config
    torch.manual_seed(0)
    plan = choose_segments(Dropping(cfg), "auto", True, False, CPU)
    assert not plan.enabled and "does not pass keyword arguments" in plan.reason


def test_a_sliding_window_shorter_than_the_examples_is_honoured():
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, sliding_window=4)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg)
    assert choose_segments(model, "auto", True, False, CPU).enabled
    register()
    batch = _packed_batch(64)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        plan = choose_segments(model, "segments", True, False, CPU)
        with plan.active():
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                        **{SEGMENTS: segment_lengths(batch["position_ids"])}).logits
    torch.testing.assert_close(got, masked, rtol=1e-4, atol=1e-5)


# -- in training runs ------------------------------------------------------------------------------


def _trainer(tok, mode, data, **kw):
    pm = _lora(peftkit.load_model()[0])
    cfg = TrainConfig(progress=False, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                      batch_size=4, micro_batch_size=2, max_steps=3, lr=1e-2, seed=0, packed_attention=mode, **kw)
    return Trainer(pm, tok, data, None, cfg, task_type="CAUSAL_LM", quiet=True, packing=True, max_length=64)


@pytest.fixture(scope="module")
def packed_data():
    from peftkit.train.data import Dataset

    g = torch.Generator().manual_seed(3)
    exs = []
    for i in range(24):
        n = 6 + int(torch.randint(0, 20, (1,), generator=g))
        ids = torch.randint(3, 512, (n,), generator=g).tolist()
        exs.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * (n // 2) + ids[n // 2:]))
    return Dataset(exs, "tokens", "CAUSAL_LM")


@pytest.mark.parametrize("checkpointing,head", [(False, "auto"), (True, "auto"), (False, "full")],
                         ids=["plain", "checkpointing", "full-logits"])
def test_training_steps_equal_the_masked_road(tok, packed_data, checkpointing, head):
    runs = {m: _trainer(tok, m, packed_data, gradient_checkpointing=checkpointing, loss_head=head)
            for m in ("mask", "segments")}
    assert runs["segments"].segments.enabled and not runs["mask"].segments.enabled
    assert runs["segments"].start_report()["packed attention"].startswith("per example")
    for t in runs.values():  # SGD: Adam's g / sqrt(v) would turn float rounding of near-zero entries into lr steps
        t.optimizer = torch.optim.SGD(t.params, lr=0.1)
    losses = {m: [t.train_step(t.micro_batches(s)) for s in range(3)] for m, t in runs.items()}
    assert losses["segments"] == pytest.approx(losses["mask"], rel=1e-5)
    a = dict(runs["mask"].model.named_parameters())
    for n, p in runs["segments"].model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=1e-4, atol=1e-6, msg=n)
    assert runs["segments"].model.get_base_model().config._attn_implementation == "sdpa"


def test_a_refused_combination_leaves_the_model_as_it_came(tok, packed_data):
    """--packed-attention segments with --compile on is refused before any block is compiled."""
    from peftkit.train.speed import decoder_blocks

    pm = _lora(peftkit.load_model()[0])
    cfg = TrainConfig(progress=False, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                      batch_size=4, max_steps=1, packed_attention="segments", compile="on")
    with pytest.raises(ConfigError, match="recompile"):
        Trainer(pm, tok, packed_data, None, cfg, task_type="CAUSAL_LM", quiet=True, packing=True, max_length=64)
    base = pm.get_base_model()
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in decoder_blocks(base))
    assert base.config._attn_implementation == "sdpa"
