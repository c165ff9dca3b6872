"""The last decoder block's q/o projections and MLP at target positions only (peftkit.train.last_block):
the same loss and gradients as the whole block, only the target rows computed, which models and runs
take it and why, and no hook left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.train.collate import collate, pack
from peftkit.train.config import TrainConfig
from peftkit.train.data import IGNORE_INDEX, Example
from peftkit.train.last_block import LastBlock, at_targets, choose_last_block
from peftkit.train.loss_head import LossForward, LossHead, choose_loss_head, target_index
from tests.models import tiny_gpt2, tiny_llama


def _batch(layout: str, vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    exs = []
    for n, prompt in ((9, 4), (5, 2), (12, 7), (6, 1), (8, 5)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        exs.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(exs if layout == "padded" else pack(exs, 24), 0, "CAUSAL_LM")


def _lora(model: nn.Module, targets, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights="gaussian",
                                                          target_modules=targets, lora_dropout=dropout))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return pm.train()


def _run(model: nn.Module, plan: LossHead, batch: dict[str, torch.Tensor]):
    model.zero_grad(set_to_none=True)
    loss = LossForward(model, "CAUSAL_LM", plan)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "o_proj", "down_proj", "lm_head"]])
def test_the_cut_gives_the_whole_blocks_loss_and_gradients(layout, targets):
    model = tiny_llama()
    pm = _lora(model, targets)
    plan = choose_loss_head(pm, "CAUSAL_LM")
    assert plan.last_block is not None and plan.last_block.enabled, plan.last_block
    mlp = model.model.layers[-1].mlp
    assert plan.last_block.modules == [model.model.layers[-1].self_attn.q_proj,
                                       model.model.layers[-1].self_attn.o_proj, mlp]
    whole = LossHead("chunked", "reference", plan.body, plan.head, plan.chunk_rows, LastBlock(reason="test"))
    batch = _batch(layout)
    rows_seen = []
    handle = mlp.down_proj.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].reshape(-1, 32).shape[0]))
    try:
        ref, g_ref = _run(pm, whole, batch)
        cut, g_cut = _run(pm, plan, batch)
    finally:
        handle.remove()
    labels = batch["labels"]
    assert rows_seen == [labels.numel(), len(target_index(labels))]  # the cut's MLP saw the target rows only
    assert rows_seen[1] < rows_seen[0]
    torch.testing.assert_close(cut, ref, rtol=1e-5, atol=1e-5)
    assert g_ref.keys() == g_cut.keys()
    for k in g_ref:
        torch.testing.assert_close(g_cut[k], g_ref[k], rtol=1e-4, atol=1e-6 * (1 + float(g_ref[k].abs().max())), msg=k)
    last = [k for k in g_ref if "layers.1." in k and "lora_B" in k]
    assert last and all(float(g_cut[k].abs().sum()) > 0 for k in last)  # the cut modules still learn


def test_modules_with_dropout_are_left_whole():
    """LoRA dropout on q/v: q_proj keeps every row (its masks are the whole block's draws), the rest is cut."""
    model = tiny_llama()
    pm = _lora(model, ["q_proj", "v_proj"], dropout=0.2)
    cut = choose_last_block(model.model)
    attention = model.model.layers[-1].self_attn
    assert cut.modules == [attention.o_proj, model.model.layers[-1].mlp]
    all_drop = _lora(tiny_llama(), "all-linear", dropout=0.2)
    cut = choose_last_block(all_drop.get_base_model().model)
    assert not cut.enabled and "dropout" in cut.reason
    plan = choose_loss_head(pm, "CAUSAL_LM")
    torch.manual_seed(5)
    a = _run(pm, plan, _batch("packed"))
    torch.manual_seed(5)
    b = _run(pm, LossHead("chunked", "ref", plan.body, plan.head, plan.chunk_rows), _batch("packed"))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)  # the same dropout draws


def test_models_without_the_shape_keep_the_whole_block():
    gpt2 = choose_last_block(tiny_gpt2().transformer)
    assert not gpt2.enabled and "no mlp and self_attn.o_proj" in gpt2.reason
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                           num_local_experts=4, num_experts_per_tok=2))
    cut = choose_last_block(moe.model)
    assert not cut.enabled and "mixture of experts" in cut.reason


class _MixingMLP(nn.Module):
    """Not per position: each output row is the running sum of the rows before it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).cumsum(dim=1)


def test_a_block_that_mixes_positions_fails_the_probe():
    model = tiny_llama()
    model.model.layers[-1].mlp = _MixingMLP(model.model.layers[-1].mlp)
    cut = choose_last_block(model.model)
    assert not cut.enabled and "change when other positions are left out" in cut.reason
    assert not model.model.layers[-1].mlp._forward_hooks and not model.model.layers[-1].mlp._forward_pre_hooks


def test_hooks_are_removed_after_the_call_and_after_an_error():
    model = tiny_llama()
    cut = choose_last_block(model.model)
    assert cut.enabled
    index = torch.tensor([1, 2])
    with at_targets(cut, index, 1, 4):
        assert all(m._forward_hooks and m._forward_pre_hooks for m in cut.modules)
        model.model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    with pytest.raises(RuntimeError, match="boom"):
        with at_targets(cut, index, 1, 4):
            raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cut.modules)
    full = model.model(input_ids=torch.tensor([[3, 4, 5, 6]])).last_hidden_state
    assert full.shape == (1, 4, 16)


def test_trainer_reports_the_cut_and_keeps_the_block_whole_with_checkpointing(tok):
    from peftkit.train.config import DataConfig
    from peftkit.train.data import bundled_data, prepare_data, read_records
    from peftkit.train.loop import Trainer

    recs = read_records(bundled_data()[0])[:8]
    prepared = prepare_data(DataConfig(eval_fraction=0, max_length=96), tok, lambda f: "CAUSAL_LM",
                            train_source=recs[:6], eval_source=recs[6:])
    reports = {}
    for name, kw in (("default", {}), ("checkpointing", {"gradient_checkpointing": True}),
                     ("off", {"last_block_at_targets": False})):
        model, _ = peftkit.load_model()
        pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4))
        cfg = TrainConfig(progress=False, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0,
                          batch_size=2, max_steps=1, **kw)
        t = Trainer(pm, tok, prepared.train, prepared.eval, cfg, task_type="CAUSAL_LM", quiet=True)
        reports[name] = t.loss_head.describe()
        assert t.loss_head.last_block.enabled is (name == "default")
    assert "last block's q/o projections and MLP at target positions only" in reports["default"]
    assert "last block whole (activation checkpointing recomputes the block without the cut)" in reports["checkpointing"]
    assert "last block whole (last_block_at_targets off)" in reports["off"]
