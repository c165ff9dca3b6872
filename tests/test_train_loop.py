"""The training loop: schedules, accumulation equivalence, early stopping, checkpoints, resume after
kill -9, data parallelism with 2 processes, transformers.Trainer integration."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import peftkit
from peftkit.errors import CheckpointError, PeftkitError
from peftkit.train import checkpoints as ckpt
from peftkit.train.config import DataConfig, TrainConfig
from peftkit.train.data import bundled_data, prepare_data, read_records
from peftkit.train.loop import Trainer, lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_data(tok):
    recs = read_records(bundled_data()[0])[:24]
    return prepare_data(DataConfig(eval_fraction=0, max_length=160), tok, lambda f: "CAUSAL_LM", train_source=recs[:16],
                        eval_source=recs[16:24])


def make_trainer(tok, data, tmp=None, dropout=0.0, **train_kw):
    model, _ = peftkit.load_model()
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=dropout,
                                                          init_lora_weights="gaussian"))
    with torch.no_grad():  # non-zero B so that every step changes the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    settings = dict(progress=False, eval_steps=0, save_steps=0, num_generations=0, eval_generate_samples=0)
    settings.update(train_kw)
    cfg = TrainConfig(**settings)
    return Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", output_dir=str(tmp) if tmp else None,
                   quiet=True)


def adapter_tensors(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_lr_schedules():
    f = lr_lambda(total=10, warmup=2, kind="linear")
    assert [round(f(s), 4) for s in range(4)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 0.875]
    assert f(10) == 0.0
    c = lr_lambda(total=10, warmup=0, kind="cosine")
    assert c(0) == 1.0 and abs(c(5) - 0.5) < 1e-12 and abs(c(10)) < 1e-12
    assert lr_lambda(10, 0, "constant")(7) == 1.0


def test_accumulation_equals_one_big_batch(tok, small_data):
    """8 = 8 x 1 and 8 = 2 x 4 (padding differs per micro-batch) give the same gradients and steps.

    Compared under SGD: Adam's first steps are ~lr * sign(g), which turns float-rounding noise of
    near-zero gradient entries into O(lr) differences and hides what is being tested.
    """
    a = make_trainer(tok, small_data, batch_size=8, max_steps=2, lr=1e-2)
    b = make_trainer(tok, small_data, batch_size=8, micro_batch_size=2, max_steps=2, lr=1e-2)
    assert (a.accum, b.accum) == (1, 4)
    for t in (a, b):
        t.optimizer = torch.optim.SGD(t.params, lr=1.0)
    losses_a = [a.train_step(a.micro_batches(s)) for s in range(2)]
    losses_b = [b.train_step(b.micro_batches(s)) for s in range(2)]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    # and training did change the adapter
    c = make_trainer(tok, small_data, batch_size=8, max_steps=2)
    assert any(not torch.equal(ta[k], v) for k, v in adapter_tensors(c).items())


def test_loss_is_token_weighted_over_the_global_batch(tok, small_data):
    from peftkit.train.loop import batch_count, loss_sum

    t = make_trainer(tok, small_data, batch_size=8, micro_batch_size=4, max_steps=1, lr=0.0)
    batches = t.micro_batches(0)
    with torch.no_grad():
        total = sum(float(loss_sum(t.model, b, "CAUSAL_LM")[0]) for b in batches)
    count = sum(batch_count(b, "CAUSAL_LM") for b in batches)
    assert t.train_step(batches) == pytest.approx(total / count, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_step(tok, small_data):
    a = make_trainer(tok, small_data, batch_size=4, max_steps=1, lr=1e-2)
    b = make_trainer(tok, small_data, batch_size=4, max_steps=1, lr=1e-2, gradient_checkpointing=True)
    for t in (a, b):
        t.optimizer = torch.optim.SGD(t.params, lr=1.0)
        t.train_step(t.micro_batches(0))
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


def test_early_stopping(tok, small_data, tmp_path):
    t = make_trainer(tok, small_data, tmp_path, batch_size=4, max_steps=10, lr=0.0, eval_steps=1,
                     early_stopping_patience=2)
    result = t.fit()
    assert result.stopped_early and result.steps == 2  # lr 0: the eval loss never improves
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 1, 2, 2]
    assert all("loss" in e for e in events if e["event"] == "train")
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_batch_geometry_errors(tok, small_data):
    with pytest.raises(PeftkitError, match="micro_batch_size 3 must divide"):
        make_trainer(tok, small_data, batch_size=8, micro_batch_size=3)
    with pytest.raises(PeftkitError, match="fewer than one global batch"):
        make_trainer(tok, small_data, batch_size=32)


# -- checkpoints --------------------------------------------------------------------------------


def _write(folder, step, payload=b"w"):
    def save_adapter(path):
        os.makedirs(path)
        with open(os.path.join(path, "adapter_model.safetensors"), "wb") as fh:
            fh.write(payload)

    return ckpt.write_checkpoint(str(folder), step, save_adapter=save_adapter,
                                 optimizer={"state": {}, "param_groups": []}, scheduler={"last_epoch": step}, rng=[ckpt.rng_state()], state={"step": step})


def test_checkpoints_are_atomic_verified_and_pruned(tmp_path):
    folder = tmp_path / "checkpoints"
    _write(folder, 2)
    newest = _write(folder, 4)
    assert ckpt.latest_checkpoint(str(folder)) == newest
    assert ckpt.load_checkpoint(newest)["scheduler"] == {"last_epoch": 4}
    # a half-written checkpoint (a crash before COMPLETE.json was renamed in) is never picked up
    partial = folder / "step-6"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"partial")
    (folder / ".tmp-step-8-abc").mkdir()
    with pytest.warns(peftkit.PeftkitWarning, match="step-6: no COMPLETE.json"):
        assert ckpt.latest_checkpoint(str(folder)) == newest
    # a corrupted file is detected by its hash, and the previous checkpoint is used
    with open(os.path.join(newest, "adapter", "adapter_model.safetensors"), "wb") as fh:
        fh.write(b"x")
    with pytest.warns(peftkit.PeftkitWarning, match="SHA-256"):
        assert ckpt.latest_checkpoint(str(folder)).endswith("step-2")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(newest)
    # truncation too
    with open(os.path.join(folder, "step-2", "rng.pt"), "r+b") as fh:
        fh.truncate(10)
    with pytest.warns(peftkit.PeftkitWarning):
        assert ckpt.latest_checkpoint(str(folder)) is None
    ckpt.prune(str(folder), keep=1)
    assert not (folder / ".tmp-step-8-abc").exists()


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# -- resume after kill -9 -------------------------------------------------------------------------

# explicit data: the plain defaults apply (no demo settings), the same in all three processes
TRAIN_FLAGS = ["--data", bundled_data()[0], "--eval-data", bundled_data()[1],
               "--max-steps", "12", "--save-steps", "4", "--batch-size", "8", "--micro-batch-size", "4",
               "--lora-dropout", "0.1", "--r", "4", "--eval-steps", "0", "--eval-generate-samples", "0",
               "--num-generations", "0", "--max-eval-samples", "8", "--max-length", "160", "--no-progress"]

KILLER = textwrap.dedent("""
    import os, signal, sys
    from peftkit.cli import build_train_parser, merge_settings, _nest
    from peftkit.train import RunConfig, train

    def kill_after_step_10(trainer):
        if trainer.step == 10:  # checkpoints 4 and 8 are complete; the process dies mid-run
            os.kill(os.getpid(), signal.SIGKILL)

    args = build_train_parser("lora").parse_args(sys.argv[1:])
    train(RunConfig.from_dict(merge_settings(None, _nest(args))), callbacks=[kill_after_step_10], quiet=True)
""")


def _run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kw)


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    r = _run(["-m", "peftkit", "train", "--output-dir", str(straight), *TRAIN_FLAGS])
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    r = _run([str(script), "--output-dir", str(killed), *TRAIN_FLAGS])
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert not (killed / "adapter").exists()
    assert sorted(os.listdir(killed / "checkpoints")) == ["step-4", "step-8"]

    r = _run(["-m", "peftkit", "train", "--output-dir", str(killed), "--resume", *TRAIN_FLAGS])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-8" in r.stdout
    assert re.search(r"packed attention\s+per example", r.stdout)  # the default road on the CPU, resumed
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    # the metrics log has no duplicate steps from the killed run
    steps = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl") if '"train"' in line]
    assert steps == sorted(set(steps)) == [10, 12]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    # --set r=4: torchrun's own argument parser would take --r for an abbreviation of its flags
    flags = ["--max-steps", "3", "--batch-size", "8", "--micro-batch-size", "2", "--set", "r=4", "--eval-steps", "0",
             "--save-steps", "0", "--eval-generate-samples", "0", "--num-generations", "0", "--max-eval-samples", "8",
             "--max-length", "160", "--no-progress", "--lr", "0.01"]
    from peftkit.cli import main

    assert main(["train", "--output-dir", str(tmp_path / "one"), *flags]) == 0  # the reference, in this process
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "peftkit", "train",
                "--output-dir", str(tmp_path / "two"), *flags])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 micro x 2 accumulation x 2 processes" in two.stdout
    import yaml

    for run in ("one", "two"):  # packed rows, attention per example: the default road on the CPU
        resolved = yaml.safe_load((tmp_path / run / "run.yaml").read_text())["resolved"]
        assert resolved["packed_attention"].startswith("per example"), resolved
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    # Float tolerance: the all-reduce sums gradients in another order, and Adam's g / sqrt(v) turns the
    # rounding of a near-zero gradient entry into a step of up to lr in either direction, so such an entry
    # may differ by up to 2 * lr * steps (seen: 3e-4 on one entry of 256, on an AVX-512 machine). Nearly
    # all entries agree to float32 precision, and so does the eval loss.
    tight = total = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2 * 0.01 * 3)
        tight += int(torch.isclose(a[k], b[k], rtol=1e-5, atol=1e-7).sum())
        total += a[k].numel()
    assert tight >= 0.98 * total
    assert any(float(v.abs().sum()) > 0 for k, v in b.items() if "lora_B" in k)  # it trained
    ev_one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")][-1]["eval_loss"]
    ev_two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")][-1]["eval_loss"]
    assert ev_one == pytest.approx(ev_two, rel=1e-4)


def test_ddp_syncs_only_adapter_gradients():
    """DDP's reducer holds the parameters with requires_grad only: the frozen base is never all-reduced."""
    import torch.distributed as dist

    model, _ = peftkit.load_model()
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=2))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        data = torch.nn.parallel.DistributedDataParallel(pm)._get_ddp_logging_data()
    finally:
        dist.destroy_process_group()
    trainable, total = pm.get_nb_trainable_parameters()
    assert data["total_parameter_size_bytes"] == 4 * trainable < 4 * total // 50
    assert data["num_parameter_tensors"] == sum(1 for p in pm.parameters() if p.requires_grad)


# -- transformers.Trainer -----------------------------------------------------------------------


@pytest.mark.slow
def test_hf_trainer_checkpoints_hold_only_the_adapter(tmp_path, tok, small_data):
    import transformers

    from peftkit.train import PeftkitTrainer
    from peftkit.train.collate import collate

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(small_data.train)

        def __getitem__(self, i):
            return small_data.train.examples[i]

    def collator(examples):
        return collate(examples, tok.pad_token_id, "CAUSAL_LM")

    def make():
        model, _ = peftkit.load_model()
        torch.manual_seed(0)
        return peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4))

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, save_steps=2,
                                          per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                          logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True)
    trainer = PeftkitTrainer(model=make(), args=args, train_dataset=DS(), data_collator=collator)
    trainer.train()
    ck = tmp_path / "hf" / "checkpoint-2"
    files = set(os.listdir(ck))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files
    assert os.path.getsize(ck / "adapter_model.safetensors") < 100_000
    final = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(trainer.model).items()}
    # resuming from checkpoint-2 reaches the same adapter
    trainer2 = PeftkitTrainer(model=make(), args=args, train_dataset=DS(), data_collator=collator)
    trainer2.train(resume_from_checkpoint=str(ck))
    again = peftkit.get_peft_model_state_dict(trainer2.model)
    for k in final:
        torch.testing.assert_close(final[k], again[k])
    # the saved adapter loads into Hugging Face PEFT
    peft = pytest.importorskip("peft")
    base, _ = peftkit.load_model()
    hf = peft.PeftModel.from_pretrained(base, str(ck))
    assert sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n) == sum(v.numel() for v in final.values())


@pytest.mark.parametrize("method", ["lora", "encoder_prefix"])
def test_encoder_decoder_seq2seq_trains_and_generates(tok, method):
    """seq2seq data on an encoder-decoder (a tiny T5 built in-process): source -> encoder, target -> labels.
    Also prefix tuning with prefixes on the encoder and the decoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4, vocab_size=512, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=tok.eos_token_id)
    model = T5ForConditionalGeneration(cfg)
    recs = [{"source": f"name[R{i}], food[Thai]", "target": f"R{i} serves Thai food."} for i in range(8)]
    data = prepare_data(DataConfig(eval_fraction=0.25), tok, lambda f: "SEQ_2_SEQ_LM", train_source=recs)
    ex = data.train.examples[0]
    assert -100 not in ex.labels and ex.prompt_ids == ex.input_ids  # the encoder gets the whole source
    if method == "lora":
        peft_config = peftkit.LoraConfig(task_type="SEQ_2_SEQ_LM", r=2)
    else:
        peft_config = peftkit.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_prefix=True)
    pm = peftkit.get_peft_model(model, peft_config)
    cfg_t = TrainConfig(batch_size=2, max_steps=2, lr=1e-2, progress=False, eval_steps=0, save_steps=0,
                        num_generations=0, eval_generate_samples=2, max_new_tokens=4)
    t = Trainer(pm, tok, data.train, data.eval, cfg_t, task_type="SEQ_2_SEQ_LM", quiet=True)
    result = t.fit()
    assert result.steps == 2 and {"eval_loss", "eval_perplexity", "eval_rouge_l"} <= set(result.metrics_after)
    assert result.metrics_after["eval_loss"] < result.metrics_before["eval_loss"]


def test_bf16_autocast_on_cpu(tok, small_data):
    t = make_trainer(tok, small_data, batch_size=4, max_steps=1, lr=1e-2, precision="bf16")
    assert t.precision == "bf16"
    loss = t.train_step(t.micro_batches(0))
    assert loss == loss and all(p.dtype == torch.float32 for p in t.params)  # adapters stay fp32
    with pytest.raises(PeftkitError, match="fp16 needs a GPU"):
        make_trainer(tok, small_data, batch_size=4, max_steps=1, precision="fp16")
