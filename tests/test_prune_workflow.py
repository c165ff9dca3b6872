"""The pruning workflow from the command line (issue 17): ``peftkit prune`` -> ``peftkit train --keep-sparsity``
(LoRA recovery with ΔW masked) -> ``peftkit merge --keep-sparsity`` (exact, every pruned zero kept), on the bundled
model and data; structured pruning with ``--heads/--channels``; bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.cli import main
from peftkit.prune import load_masks


def _zeros_kept(model, masks) -> tuple[int, int]:
    modules = dict(model.named_modules())
    pruned = filled = 0
    for name, mask in masks.items():
        w = modules[name].weight.detach()
        pruned += int((~mask).sum())
        filled += int(torch.count_nonzero(w[~mask]))
    return pruned, filled


@pytest.mark.slow
def test_prune_recover_merge_keeps_every_zero(tmp_path, capsys):
    pruned_dir, run_dir, merged_dir, dense_dir = (tmp_path / n for n in ("pruned", "run", "merged", "dense"))
    assert main(["prune", "--method", "wanda", "--sparsity", "0.5", "--calibration-samples", "16",
                 "--max-eval-samples", "8", "--no-latency", "--output-dir", str(pruned_dir)]) == 0
    files = set(os.listdir(pruned_dir))
    assert {"config.json", "model.safetensors", "pruning_masks.safetensors", "report.json", "tokenizer.json"} <= files
    report = json.loads((pruned_dir / "report.json").read_text())
    assert report["pruned_layers"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["pruned"]["nonzeros"] < report["dense"]["nonzeros"]
    assert report["pruned"]["eval_loss"] > report["dense"]["eval_loss"]  # pruning costs quality
    masks = load_masks(str(pruned_dir / "pruning_masks.safetensors"))
    pruned_model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert _zeros_kept(pruned_model, masks)[1] == 0  # the folder holds the zeros

    assert main(["train", "--model", str(pruned_dir), "--keep-sparsity", "--max-steps", "6", "--lr", "0.01",
                 "--batch-size", "4", "--eval-steps", "0", "--save-steps", "0", "--num-generations", "0",
                 "--max-eval-samples", "8", "--target-modules", "all-linear", "--no-progress",
                 "--output-dir", str(run_dir)]) == 0
    assert "sparsity kept" in capsys.readouterr().out
    adapter = run_dir / "adapter"
    assert main(["merge", str(adapter), "--keep-sparsity", "--output-dir", str(merged_dir)]) == 0
    assert "kept all" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    pruned, filled = _zeros_kept(merged, masks)
    assert pruned > 100_000 and filled == 0
    assert os.path.isfile(merged_dir / "pruning_masks.safetensors")  # still a pruned folder for the next round
    # the merged model is the masked adapter model, exactly as it ran
    loaded = peftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned_dir), str(adapter))
    peftkit.keep_sparsity(loaded, masks)
    ids = torch.tensor([[1, 45, 20, 310, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)
    # a plain merge (no --keep-sparsity) is dense, and says how many zeros it filled
    assert main(["merge", str(adapter), "--output-dir", str(dense_dir)]) == 0
    out = capsys.readouterr().out
    assert "trained with --keep-sparsity" in out and "filled" in out
    assert _zeros_kept(AutoModelForCausalLM.from_pretrained(dense_dir), masks)[1] > 0


@pytest.mark.slow
def test_structured_prune_command_writes_a_smaller_model(tmp_path):
    out = tmp_path / "s"
    assert main(["prune", "--heads", "0.5", "--channels", "0.25", "--max-eval-samples", "8", "--no-latency",
                 "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["structured"]["heads"] == [8, 4] and report["structured"]["channels"] == [172, 129]
    assert report["pruned"]["parameters"] < report["dense"]["parameters"]
    model = peftkit.load_structured(str(out))
    assert model.model.layers[0].mlp.down_proj.in_features == 129
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["parameters"]


@pytest.mark.slow
def test_recovery_on_a_structured_folder_its_config_cannot_state(tmp_path):
    """6 of 8 heads: transformers' LlamaConfig cannot say so (64 is no multiple of 6), so the folder needs
    load_structured; train, merge and the merged folder keep working."""
    pruned, run, merged = tmp_path / "p", tmp_path / "r", tmp_path / "m"
    assert main(["prune", "--heads", "0.25", "--method", "magnitude", "--max-eval-samples", "8", "--no-latency",
                 "--output-dir", str(pruned)]) == 0
    assert json.loads((pruned / "structure.json").read_text())["config_describes_model"] is False
    assert main(["train", "--model", str(pruned), "--max-steps", "3", "--lr", "0.01", "--eval-steps", "0",
                 "--save-steps", "0", "--num-generations", "0", "--max-eval-samples", "8", "--no-progress",
                 "--output-dir", str(run)]) == 0
    assert main(["merge", str(run / "adapter"), "--output-dir", str(merged)]) == 0
    model = peftkit.load_structured(str(merged))
    assert model.model.layers[0].self_attn.o_proj.in_features == 48
    base = peftkit.load_structured(str(pruned))
    with_adapter = peftkit.PeftModel.from_pretrained(base, str(run / "adapter"))
    ids = torch.tensor([[1, 45, 20, 310, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_adapter(ids).logits, rtol=1e-5, atol=1e-5)


def test_prune_command_bad_input(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", "--sparsity", "1.5", "--output-dir", str(out)]) == 2
    assert "sparsity" in capsys.readouterr().err and not out.exists()
    assert main(["prune", "--pattern", "3:2", "--method", "magnitude", "--output-dir", str(out)]) == 2
    assert not out.exists()
    assert main(["prune", "--heads", "0.3", "--sparsity", "0.5", "--output-dir", str(out)]) == 2
    assert "choose one kind" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["prune", "--output-dir", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["train", "--model", str(peftkit.model_path()), "--keep-sparsity", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "r")]) == 2
    assert "pruning_masks.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")
