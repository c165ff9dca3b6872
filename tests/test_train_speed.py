"""The training speed paths: LoRA's fused training road, torch.compile of the blocks, activation
checkpointing chosen by a memory estimate, and the loss positions found on the host. Each gives the
plain path's loss and gradients (to float tolerance) on tiny seeded models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.lora import FusedLoraLinear, set_fused_training
from peftkit.methods.lora.fused import fallback_reason
from peftkit.train import speed
from peftkit.train.config import TrainConfig
from peftkit.train.loss_head import target_index
from tests.models import tiny_gpt2, tiny_llama


def lora_llama(dropout: float = 0.0, bias: bool = False, dora: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout, lora_bias=bias,
                             use_dora=dora, target_modules="all-linear", init_lora_weights="gaussian")
    pm = peftkit.get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():  # non-zero B (and lora_B bias): the adapter changes the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    return pm.train()


def loss_and_grads(pm: nn.Module, ids: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=rtol, atol=atol, msg=k)


# -- fused LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.3, False), (0.3, True)])
def test_fused_lora_matches_the_plain_layer(dropout, bias):
    pm = lora_llama(dropout, bias)
    ids = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = loss_and_grads(pm, ids)
    counts = set_fused_training(pm)
    assert counts == {"fused": 14}  # 2 blocks x 7 linear layers
    fused = loss_and_grads(pm, ids)
    assert_same(plain, fused)
    # the same dropout draws: the RNG stream after the step is the plain path's
    set_fused_training(pm, False)
    loss_and_grads(pm, ids)
    after_plain = torch.rand(3)
    set_fused_training(pm)
    loss_and_grads(pm, ids)
    torch.testing.assert_close(torch.rand(3), after_plain, rtol=0, atol=0)


def test_fused_function_against_a_direct_computation():
    """y = x Wᵀ + b + s (x̃ Aᵀ) Bᵀ + s b_B and its gradients, against autograd of that formula."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    W, b = torch.randn(7, 6, generator=g, requires_grad=True), torch.randn(7, generator=g, requires_grad=True)
    A, B = torch.randn(3, 6, generator=g, requires_grad=True), torch.randn(7, 3, generator=g, requires_grad=True)
    bB = torch.randn(7, generator=g, requires_grad=True)
    s, p = 0.75, 0.4
    torch.manual_seed(9)
    y = FusedLoraLinear.apply(x, W, b, A, B, bB, s, p)
    grad = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [x, W, b, A, B, bB], grad)
    torch.manual_seed(9)
    keep = torch.empty(10, 6).bernoulli_(1 - p).view(2, 5, 6)
    ref = x @ W.T + b + s * ((x * keep / (1 - p)) @ A.T) @ B.T + s * bB
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(got, torch.autograd.grad(ref, [x, W, b, A, B, bB], grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_fused_lora_fallbacks_are_named():
    dora = lora_llama(dora=True)
    assert set_fused_training(dora) == {"DoRA": 14}
    torch.manual_seed(0)
    gpt2 = peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                  target_modules=["c_attn"]))
    assert set_fused_training(gpt2) == {"fan_in_fan_out (Conv1D) base": 2}
    two = lora_llama()
    two.add_adapter("other", peftkit.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    layer = two.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["default", "other"])
    assert fallback_reason(layer) == "2 active adapters"


def test_fused_lora_falls_back_where_it_does_not_apply():
    """DoRA with fusing on takes the general path: the same loss and gradients as with fusing off."""
    pm = lora_llama(0.2, dora=True)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    plain = loss_and_grads(pm, ids)
    set_fused_training(pm)
    assert_same(plain, loss_and_grads(pm, ids), rtol=0, atol=0)


# -- the loss positions ------------------------------------------------------------------------------


def test_target_index_selects_the_loss_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    idx = target_index(labels)
    # position (b, t) predicts labels[b, t + 1]: (0, 1), (0, 2), (1, 0), (1, 3)
    assert idx.tolist() == [1, 2, 5, 8]
    assert labels.reshape(-1)[idx + 1].tolist() == [5, 6, 7, 8]


# -- compile ---------------------------------------------------------------------------------------


def test_decoder_blocks_and_compile_choice():
    pm = lora_llama()
    blocks = speed.decoder_blocks(pm)
    assert blocks == list(pm.base_model.model.model.layers)
    cpu = torch.device("cpu")
    assert not speed.choose_compile(pm, "off", cpu).enabled
    assert speed.choose_compile(pm, "on", cpu).enabled
    auto = speed.choose_compile(pm, "auto", cpu)
    assert auto.enabled == ("cpu" in speed.COMPILE_AUTO_DEVICES) and auto.describe()
    with pytest.raises(ConfigError, match="no repeated blocks"):
        speed.choose_compile(nn.Sequential(nn.Linear(2, 2)), "on", cpu)
    with pytest.raises(ConfigError, match="compile must be one of"):
        speed.choose_compile(pm, "yes", cpu)
    with pytest.raises(ConfigError):
        TrainConfig(compile="fast")


def test_lora_layer_has_no_graph_break():
    pm = lora_llama(0.1)
    set_fused_training(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 5, 16, requires_grad=True))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


# -- activation checkpointing by the memory estimate ----------------------------------------------


def test_activation_estimate_drops_with_checkpointing():
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "labels": ids}

    def forward(model):
        return lambda b: model(**b).loss

    pm = lora_llama(0.1)
    state = torch.random.get_rng_state()
    plain = speed.activation_bytes_per_token(forward(pm), pm, batch)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe's dropout draws are undone
    assert all(p.grad is None for p in pm.parameters())
    speed.enable_checkpointing(pm.base_model.model)
    checkpointed = speed.activation_bytes_per_token(forward(pm), pm, batch)
    # at least the hidden states of a block (16 floats a token) are saved; checkpointing keeps less
    assert plain > 16 * 4 and checkpointed < 0.7 * plain


def test_checkpointing_choice_by_memory(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(speed, "available_memory", lambda device: 1000)
    small = speed.choose_checkpointing(None, lambda: 1.0, 100, cpu, True)
    big = speed.choose_checkpointing(None, lambda: 10.0, 100, cpu, True)
    assert not small.enabled and "10%" in small.describe()
    assert big.enabled and "100%" in big.describe()
    assert speed.choose_checkpointing(True, lambda: 0.0, 1, cpu, True).enabled
    assert not speed.choose_checkpointing(False, lambda: 1e9, 1, cpu, True).enabled
    assert not speed.choose_checkpointing(None, lambda: 1e9, 1, cpu, False).enabled
    monkeypatch.undo()
    assert speed.available_memory(cpu) > 0


# -- in the trainer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tok):
    from peftkit.train.config import DataConfig
    from peftkit.train.data import bundled_data, prepare_data, read_records

    recs = read_records(bundled_data()[0])[:16]
    return prepare_data(DataConfig(eval_fraction=0, max_length=160), tok, lambda f: "CAUSAL_LM",
                        train_source=recs[:12], eval_source=recs[12:])


def trainer(tok, data, **kw):
    from peftkit.train.loop import Trainer

    model, _ = peftkit.load_model()
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.1,
                                                          init_lora_weights="gaussian"))
    cfg = TrainConfig(progress=False, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                      batch_size=4, max_steps=2, lr=1e-2, **kw)
    return Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", quiet=True)


def test_trainer_fused_and_plain_take_the_same_steps(tok, small_data):
    a, b = trainer(tok, small_data, fused_lora=False), trainer(tok, small_data)
    assert "fused" in b.start_report()["fused LoRA"] and "off" in a.start_report()["fused LoRA"]
    for t in (a, b):
        t.optimizer = torch.optim.SGD(t.params, lr=1.0)  # Adam would amplify rounding noise (test_train_loop)
    losses = [[], []]
    for s in range(2):
        for i, t in enumerate((a, b)):
            torch.manual_seed(s)  # the same dropout draws for both
            losses[i].append(t.train_step(t.micro_batches(s)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_trainer_reports_its_speed_choices(tok, small_data):
    t = trainer(tok, small_data)
    report = t.start_report()
    assert report["activation checkpointing"].startswith("off (activations ~")
    assert "available" in report["activation checkpointing"]
    assert report["compile"] == t.compile_plan.describe()
    forced = trainer(tok, small_data, gradient_checkpointing=True, compile="off")
    assert forced.start_report()["activation checkpointing"] == "on (asked for)"
    assert forced.start_report()["compile"] == "eager (compile off)"


def test_fused_lora_saves_a_bool_mask_for_dropout():
    """With dropout the plain path keeps the dropped input and the float noise per layer; the fused
    node keeps x, the rank-r product and a bool mask: fewer activation bytes, none more without dropout."""
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "labels": ids}
    sizes = {}
    for dropout in (0.0, 0.2):
        pm = lora_llama(dropout)
        for fused in (False, True):
            set_fused_training(pm, fused)
            sizes[dropout, fused] = speed.activation_bytes_per_token(lambda b: pm(**b).loss, pm, batch)
    assert sizes[0.0, True] == sizes[0.0, False]
    assert sizes[0.2, True] < sizes[0.2, False]


def test_trainer_compiled_blocks_take_the_eager_steps(tok, small_data):
    """--compile on: the same steps as eager (to float tolerance); eval runs eager; the model leaves uncompiled."""
    torch._dynamo.reset()
    a, b = trainer(tok, small_data, compile="off"), trainer(tok, small_data, compile="on")
    blocks = speed.decoder_blocks(b.model)
    assert len(blocks) == 5 and all(blk._compiled_call_impl is not None for blk in blocks)
    assert b.start_report()["compile"] == "torch.compile of the 5 decoder blocks (asked for)"
    # compiled blocks would run without the last-block hooks: the compiled run keeps the whole block
    assert a.loss_head.last_block.enabled and not b.loss_head.last_block.enabled
    assert b.loss_head.last_block.reason == "compiled blocks run the block without the cut"
    losses = [[], []]
    for s in range(2):
        for i, t in enumerate((a, b)):
            t.optimizer = torch.optim.SGD(t.params, lr=1.0) if s == 0 else t.optimizer
            t.model.train()
            torch.manual_seed(s)
            losses[i].append(t.train_step(t.micro_batches(s)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    a.start_report()
    after = [t._after_training() for t in (a, b)]
    assert after[0]["eval_loss"] == pytest.approx(after[1]["eval_loss"], rel=1e-4)
    assert all(blk._compiled_call_impl is None for blk in blocks)
