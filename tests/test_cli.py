"""The ``peftkit`` command: flags generated from the config dataclasses, settings files, errors, and
train -> inspect -> eval -> generate -> merge end to end on the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from peftkit.cli import build_train_parser, converter, main, merge_settings, parse_set_values, _nest
from peftkit.train.config import RunConfig, TrainConfig
from peftkit.train.modeling import method_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings_of(argv, file_values=None):
    args = build_train_parser("lora").parse_args(argv)
    return RunConfig.from_dict(merge_settings(file_values, _nest(args), parse_set_values(args.set_values)))


def test_main_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "generate", "merge", "inspect"):
        assert cmd in out
    assert main(["--version"]) == 0 and "peftkit 0." in capsys.readouterr().out
    assert main(["trian"]) == 2 and "did you mean 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "inspect"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: peftkit " + command in capsys.readouterr().out


def test_train_flags_come_from_the_dataclasses():
    text = build_train_parser("lora").format_help()
    for flag in ("--method", "--model", "--data", "--eval-data", "--format", "--columns", "--packing", "--max-steps",
                 "--epochs", "--batch-size", "--micro-batch-size", "--lr", "--seed", "--eval-steps", "--save-steps",
                 "--resume", "--early-stopping-patience", "--gradient-checkpointing", "--precision",
                 "--r", "--lora-alpha", "--lora-dropout", "--target-modules", "--use-dora", "--use-rslora"):
        assert flag + " " in text or flag + "\n" in text or flag + "," in text, flag
    # each toolkit field has a flag; defaults are shown from the dataclass
    assert f"(default: {TrainConfig.lr})" in text
    # fields of the Hugging Face format that peftkit does not implement are hidden
    assert "--megatron-config" not in text


def test_methods_come_from_the_registry():
    names = method_names()
    assert {"lora", "dora"} <= set(names)
    text = build_train_parser("lora").format_help()
    for name in names:
        assert name in text
        help_text = build_train_parser(name).format_help()  # every method's parser builds
        assert "--lr" in help_text
    if "prompt-tuning" in names:
        assert "--num-virtual-tokens" in build_train_parser("prompt-tuning").format_help()
    if "ia3" in names:
        assert "--feedforward-modules" in build_train_parser("ia3").format_help()


def test_dora_is_lora_with_use_dora():
    from peftkit.train.modeling import build_peft_config

    config = build_peft_config("dora", {"r": 4}, "CAUSAL_LM")
    assert type(config).__name__ == "LoraConfig" and config.use_dora and config.r == 4


def test_flag_values_are_typed():
    run = settings_of(["--r", "16", "--lora-alpha", "32", "--target-modules", "q_proj,v_proj", "--lr", "1e-3",
                       "--max-steps", "7", "--packing", "--columns", "source=mr,target=ref", "--rank-pattern",
                       '{"q_proj": 4}', "--early-stopping-patience", "none", "--use-dora"])
    assert run.method_args == {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "rank_pattern":
                               {"q_proj": 4}, "use_dora": True}
    assert run.train.lr == 1e-3 and run.train.max_steps == 7 and run.train.early_stopping_patience is None
    assert run.data.packing is True and run.data.columns == {"source": "mr", "target": "ref"}
    import typing

    conv = converter(typing.get_type_hints(TrainConfig)["max_steps"], "--max-steps")
    assert conv("none") is None and conv("3") == 3
    from peftkit.methods.lora import LoraConfig

    tm = converter(typing.get_type_hints(LoraConfig)["target_modules"], "--target-modules")
    assert tm("all-linear") == "all-linear" and tm(r".*\.q_proj") == r".*\.q_proj" and tm("q_proj") == ["q_proj"]
    init = converter(typing.get_type_hints(LoraConfig)["init_lora_weights"], "--init-lora-weights")
    assert init("false") is False and init("gaussian") == "gaussian"


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "r": 2, "train": {"batch_size": 4, "seed": 3}, "data": {"max_length": 99}}))
    from peftkit.train.config import load_yaml

    run = settings_of(["--config", str(path), "--lr", "0.5", "--set", "seed=9"], load_yaml(path))
    assert run.train.lr == 0.5 and run.train.seed == 9 and run.train.batch_size == 4
    assert run.data.max_length == 99 and run.method_args == {"r": 2}
    assert run.train.epochs == TrainConfig.epochs


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\nr: 2\n")
    code, err = _err(capsys, ["train", "--config", str(bad)])
    assert code == 2 and "not valid YAML" in err
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    code, err = _err(capsys, ["train", "--config", str(lst)])
    assert code == 2 and "mapping" in err
    code, err = _err(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and "does not exist" in err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train: {lr: fast}\n")
    code, err = _err(capsys, ["train", "--config", str(wrong), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "lr must be of type float" in err


def test_unknown_method_and_field(tmp_path, capsys):
    code, err = _err(capsys, ["train", "--method", "lorra", "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "Unknown method 'lorra'" in err and "did you mean 'lora'" in err
    code, err = _err(capsys, ["train", "--set", "lora_alpah=3", "--output-dir", str(tmp_path / "o2"), "--max-steps", "1"])
    assert code == 2 and "lora_alpah" in err and "lora_alpha" in err


def test_missing_data_and_bad_columns(tmp_path, capsys):
    code, err = _err(capsys, ["train", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in err
    data = tmp_path / "d.csv"
    data.write_text("mr,ref\na,b\nc,d\n")
    code, err = _err(capsys, ["train", "--data", str(data), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "--columns" in err and "mr" in err
    code, err = _err(capsys, ["train", "--data", str(data), "--format", "seq2seq", "--columns", "source=mr,target=nope",
                              "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "'nope'" in err
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    code, err = _err(capsys, ["train", "--data", str(empty), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "empty" in err


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    code, err = _err(capsys, ["train", "--output-dir", str(tmp_path)])
    assert code == 2 and "--resume" in err
    code, err = _err(capsys, ["train", "--resume"])
    assert code == 2 and "--output-dir" in err


def test_other_commands_bad_input(tmp_path, capsys):
    code, err = _err(capsys, ["inspect", str(tmp_path / "none")])
    assert code == 2 and "does not exist" in err
    code, err = _err(capsys, ["inspect", str(tmp_path)])
    assert code == 2 and "not an adapter folder" in err
    code, err = _err(capsys, ["generate", "--prompt", "x", "--adapter", str(tmp_path / "none")])
    assert code == 2 and "does not exist" in err
    code, err = _err(capsys, ["generate"])
    assert code == 2 and "--prompt" in err


def test_inspect_prints_nearest_tokens_of_a_soft_prompt(tmp_path, capsys):
    """TEXT init puts each virtual token exactly on a text token: that token is its nearest (score 1)."""
    import peftkit
    from peftkit import PromptTuningConfig, get_peft_model

    model, tok = peftkit.load_model()
    path = str(peftkit.model_path())
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="Once upon a time", tokenizer_name_or_path=path)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "pt"))
    ids = tok("Once upon a time")["input_ids"][:4]
    words = tok.convert_ids_to_tokens(ids)
    assert main(["inspect", str(tmp_path / "pt"), "--nearest", "2"]) == 0
    out = capsys.readouterr().out
    assert "nearest vocabulary tokens of each virtual token" in out
    for i, word in enumerate(words):
        assert f"{i:>3}: {word!r} 1.000, " in out
    assert main(["inspect", str(tmp_path / "pt"), "--json", "--nearest", "3"]) == 0
    near = json.loads(capsys.readouterr().out)["adapters"][0]["nearest_tokens"]
    assert [row[0]["token_id"] for row in near] == ids and all(len(row) == 3 for row in near)
    assert main(["inspect", str(tmp_path / "pt"), "--nearest", "0"]) == 0
    assert "vocabulary tokens" not in capsys.readouterr().out
    # without the base model at hand: the file facts, and a note saying why there are no nearest tokens
    assert main(["inspect", str(tmp_path / "pt"), "--model", str(tmp_path / "nowhere")]) == 0
    assert "not computed" in capsys.readouterr().out
    code, err = _err(capsys, ["inspect", str(tmp_path / "pt"), "--nearest", "-1"])
    assert code == 2 and "--nearest" in err


def test_python_m_peftkit_runs():
    out = subprocess.run([sys.executable, "-m", "peftkit", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "peftkit train" in out.stdout


@pytest.mark.slow
def test_train_inspect_eval_generate_merge(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--output-dir", str(run_dir), "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
            "--batch-size", "8", "--max-eval-samples", "8", "--eval-generate-samples", "4", "--num-generations", "1",
            "--max-new-tokens", "8", "--r", "4", "--lr", "0.01", "--no-progress"]
    assert main(argv) == 0
    out = capsys_first_out = capsys.readouterr().out
    assert "resources at start" in out and "before training" in out and "after training" in out
    assert "tokens per second" in out and "peak cpu rss" in out
    assert sorted(os.listdir(run_dir)) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl", "run.yaml"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-2"]
    events = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert all("step" in e for e in events)
    assert any(e["event"] == "train" and "loss" in e for e in events)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4] and all("eval_rouge_l" in e and "eval_perplexity" in e for e in evals)
    resolved = yaml.safe_load(open(run_dir / "run.yaml"))
    assert resolved["method_args"]["r"] == 4 and resolved["train"]["max_steps"] == 4
    assert resolved["data"]["format"] == "seq2seq" and resolved["resolved"]["total_steps"] == 4
    # run.yaml is a valid --config for the same run
    again = settings_of(["--config", str(run_dir / "run.yaml")], yaml.safe_load(open(run_dir / "run.yaml")))
    assert again.method_args["r"] == 4 and again.train.lr == 0.01

    adapter = str(run_dir / "adapter")
    assert main(["inspect", adapter]) == 0
    out = capsys.readouterr().out
    # the demo settings target all-linear: 7 linear layers x 5 blocks x (A, B)
    assert "in 70 tensors" in out and "% of the base model's" in out and "(4, 64)" in out
    assert "demo run" in capsys_first_out
    assert main(["inspect", adapter, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"][0]["config"]["r"] == 4 and info["adapters"][0]["bytes"] > 0

    metrics_file = tmp_path / "m.json"
    assert main(["eval", adapter, "--max-samples", "8", "--generate-samples", "2", "--max-new-tokens", "8",
                 "--output", str(metrics_file)]) == 0
    out = capsys.readouterr().out
    assert "eval_loss" in out and "eval_rouge_l" in out
    m = json.load(open(metrics_file))
    final = [e for e in events if e["event"] == "eval"][-1]
    assert m["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4)  # same data, same model

    assert main(["generate", "--adapter", f"a={adapter}", "--adapter", f"b={adapter}", "--base", "--max-new-tokens", "6",
                 "--prompt", "name[Aromi], eatType[coffee shop]", "--prompt", "name[Zizzi], food[Thai]"]) == 0
    out = capsys.readouterr().out
    assert out.count("[a]") == 2 and out.count("[b]") == 2 and out.count("[base]") == 2
    lines = [line for line in out.splitlines() if line.strip().startswith("[")]
    assert lines[0].split("] ", 1)[1] == lines[1].split("] ", 1)[1]  # a and b are the same adapter
    assert main(["generate", "--adapter", f"a={adapter}", "--prompt", "x", "--prompt", "y", "--prompt-adapter", "a",
                 "--prompt-adapter", "base", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("[a]") == 1 and out.count("[base]") == 1

    merged = tmp_path / "merged"
    assert main(["merge", adapter, "--output-dir", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert main(["merge", adapter, "--output-dir", str(merged)]) == 2  # refuses to overwrite
    capsys.readouterr()


@pytest.mark.slow
def test_qlora_train_eval_merge_both_exports(tmp_path, capsys):
    """peftkit train --quantize 8: the base loads quantized, the adapter is an ordinary folder; eval
    and merge use the run's quantization; merge exports a float model (dequantized, exact) or a
    quantized folder (requantized, error reported) that load_quantized reads back exactly."""
    import torch
    import transformers

    import peftkit
    from peftkit.quant import Int8Linear, load_quantized

    run_dir = tmp_path / "run"
    argv = ["train", "--output-dir", str(run_dir), "--quantize", "8", "--max-steps", "3", "--batch-size", "4",
            "--max-eval-samples", "4", "--eval-generate-samples", "0", "--num-generations", "0", "--r", "4",
            "--lr", "0.01", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    resolved = yaml.safe_load(open(run_dir / "run.yaml"))
    assert resolved["model"]["quantize"] == 8
    adapter = str(run_dir / "adapter")
    # an ordinary adapter folder: it also loads onto the float base
    float_model = peftkit.PeftModel.from_pretrained(peftkit.load_model()[0], adapter)
    assert any("lora_A" in n for n, _ in float_model.named_parameters())

    loaded_q = peftkit.train.runner.load_for_inference([("default", adapter)])
    assert any(isinstance(m, Int8Linear) for m in loaded_q.model.modules())
    loaded_f = peftkit.train.runner.load_for_inference([("default", adapter)], quantize=None)
    assert not any(isinstance(m, Int8Linear) for m in loaded_f.model.modules())

    tok = loaded_q.tokenizer
    probe = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        ref = loaded_q.model(**probe).logits

    merged = tmp_path / "merged-float"
    assert main(["merge", adapter, "--output-dir", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "base dequantized" in out and "verified" in out
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**probe).logits, ref, atol=1e-4)

    merged_q = tmp_path / "merged-int8"
    assert main(["merge", adapter, "--output-dir", str(merged_q), "--export", "quantized"]) == 0
    out = capsys.readouterr().out
    assert "requantizing" in out and "reloaded folder equals the merged model" in out
    reloaded = load_quantized(merged_q).eval()
    assert any(isinstance(m, Int8Linear) for m in reloaded.modules())
    with torch.no_grad():
        err = (reloaded(**probe).logits - ref).abs().max().item()
    assert 0 < err < 0.5  # requantization moves the output a little, not a lot

    code, err_text = _err(capsys, ["merge", adapter, "--output-dir", str(tmp_path / "x"), "--export", "quantized",
                                   "--quantize", "none"])
    assert code == 2 and "--export quantized needs a quantized base" in err_text
    assert not (tmp_path / "x").exists()


def test_quantize_flag_bad_block_size_says_what_to_do(tmp_path, capsys):
    # the bundled model's down_proj rows are 172 long: NF4 blocks of 64 do not divide them
    code, err = _err(capsys, ["train", "--output-dir", str(tmp_path / "r"), "--quantize", "4", "--max-steps", "1",
                              "--no-progress"])
    assert code == 2 and "--quant-block-size" in err and "--quant-skip-modules" in err


def test_generate_beyond_the_models_context_is_refused(capsys):
    """The bundled model's context is 512 tokens: a prompt plus --max-new-tokens beyond it is one line."""
    code, err = _err(capsys, ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "100000"])
    assert code == 2 and "more than the model's context of 512 tokens" in err and "Traceback" not in err
