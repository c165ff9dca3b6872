"""peftkit.serve.vllm: adapters checked against the base before vLLM gets them; vLLM's command.

No vLLM needed: the checks read configs and safetensors headers, and the command is a list of
strings. Adapters are saved by peftkit from tiny models with fixed seeds; the expected shapes are
the LoRA formulas (A: r x in, B: out x r) applied to the base's own weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

import peftkit
from peftkit import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                     PromptTuningConfig, get_peft_model)
from peftkit.errors import CheckpointError, ConfigError
from peftkit.serve.vllm import (VLLM_MAX_LORA_RANKS, check_vllm_adapter, serve_with_vllm, smallest_max_lora_rank,
                                vllm_command)

from .models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(hidden: int = 16):
    """tiny_llama, or the same architecture with another hidden size (a different model)."""
    if hidden == 16:
        return tiny_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save_adapter(model, config, folder) -> str:
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    return save_adapter(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
                        tmp_path_factory.mktemp("good"))


def edit_config(folder, **fields) -> None:
    path = os.path.join(folder, "adapter_config.json")
    config = json.loads(open(path).read())
    config.update(fields)
    open(path, "w").write(json.dumps(config))


def copy(folder, tmp_path, name="copy") -> str:
    out = tmp_path / name
    shutil.copytree(folder, out)
    return str(out)


def test_a_good_adapter_passes_and_reports_what_was_checked(base, good):
    info = check_vllm_adapter(base, good)
    assert info == {"peft_type": "LORA", "rank": 8, "max_rank": 8, "lora_alpha": 16, "use_rslora": False,
                    "target_modules": sorted(LLAMA_TARGETS), "modules": 2 * len(LLAMA_TARGETS)}
    assert check_vllm_adapter(base, good, max_rank=8)["rank"] == 8


def test_the_shapes_checked_are_the_base_weights(base, good):
    """The A/B shapes the check accepts are exactly those of the base weights (out x in), read here
    from the model itself."""
    from safetensors import safe_open

    model = tiny_llama()
    with safe_open(os.path.join(good, "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():
            module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
            out_f, in_f = model.get_submodule(module).weight.shape
            shape = tuple(fh.get_slice(key).get_shape())
            assert shape == ((8, in_f) if ".lora_A." in key else (out_f, 8))


def test_an_adapter_for_another_model_fails_with_the_shapes(base, tmp_path):
    other = save_adapter(llama(hidden=32), LoraConfig(r=8, target_modules=LLAMA_TARGETS), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"do not fit the base weight .* another model"):
        check_vllm_adapter(base, other)


def test_embeddings_and_a_tied_head_pass_on_the_bundled_model(tmp_path):
    model, _ = peftkit.load_model()
    config = LoraConfig(r=4, target_modules=["q_proj", "embed_tokens", "lm_head"])
    folder = save_adapter(model, config, tmp_path / "emb")
    info = check_vllm_adapter(peftkit.model_path(), folder)  # lm_head is tied: not in the base's file
    assert info["target_modules"] == ["embed_tokens", "lm_head", "q_proj"]


def test_a_resized_vocabulary_in_the_file_fails(tmp_path):
    """Hugging Face PEFT saves the base embedding beside an embedding LoRA; vLLM skips that weight, so
    it must be the base's own shape (a resized vocabulary would be silently dropped)."""
    from safetensors.torch import load_file, save_file

    model, _ = peftkit.load_model()
    folder = save_adapter(model, LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "emb")
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = torch.cat([tensors[key], tensors[key][:8]])
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"shape \[520, 64\], not the base's \[512, 64\]"):
        check_vllm_adapter(peftkit.model_path(), folder)


def test_conv1d_with_fan_in_fan_out_passes(tmp_path):
    base = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(base)
    folder = save_adapter(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                          tmp_path / "gpt2-lora")
    assert check_vllm_adapter(base, folder)["modules"] == 4
    edit_config(folder, fan_in_fan_out=False)  # the same tensors read as nn.Linear no longer fit
    with pytest.raises(CheckpointError, match="do not fit"):
        check_vllm_adapter(base, folder)


@pytest.mark.parametrize("config, kind", [
    (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
    (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "PROMPT_TUNING"),
    (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "PREFIX_TUNING"),
    (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8), "P_TUNING"),
    (BottleneckConfig(), "BOTTLENECK"),
])
def test_other_methods_fail_naming_the_method(base, tmp_path, config, kind):
    folder = save_adapter(tiny_llama(), config, tmp_path / "a")
    with pytest.raises(CheckpointError, match=f"it is a {kind} adapter, and vLLM serves LoRA adapters only"):
        check_vllm_adapter(base, folder)


def test_dora_fails(base, tmp_path):
    folder = save_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), tmp_path / "d")
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora=true\)"):
        check_vllm_adapter(base, folder)
    edit_config(folder, use_dora=False)  # a config that hides it: the magnitude vectors in the file still tell
    with pytest.raises(CheckpointError, match="DoRA magnitude vector"):
        check_vllm_adapter(base, folder)


@pytest.mark.parametrize("fields, message", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "trains biases"),
    ({"lora_bias": True}, "LoRA bias"),
    ({"init_lora_weights": "pissa"}, "changes the base model's weights"),
    ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
])
def test_lora_features_vllm_lacks_fail(base, good, tmp_path, fields, message):
    folder = copy(good, tmp_path)
    edit_config(folder, **fields)
    with pytest.raises(CheckpointError, match=message):
        check_vllm_adapter(base, folder)


def test_modules_to_save_tensors_in_the_file_fail(base, tmp_path):
    folder = save_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                          tmp_path / "m")
    edit_config(folder, modules_to_save=None)
    with pytest.raises(CheckpointError, match="not a LoRA matrix .*lm_head"):
        check_vllm_adapter(base, folder)


def test_rank_above_the_maximum_fails_with_the_flag_to_use(base, tmp_path):
    folder = save_adapter(tiny_llama(), LoraConfig(r=12, target_modules=["q_proj"]), tmp_path / "r")
    assert check_vllm_adapter(base, folder)["rank"] == 12
    with pytest.raises(CheckpointError, match=r"rank 12 is above the maximum rank 8.*--max-lora-rank 16"):
        check_vllm_adapter(base, folder, max_rank=8)
    with pytest.raises(ConfigError, match="max_rank"):
        check_vllm_adapter(base, folder, max_rank=0)


def test_rank_pattern_ranks_are_checked_per_module(base, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})
    folder = save_adapter(tiny_llama(), config, tmp_path / "rp")
    assert check_vllm_adapter(base, folder)["max_rank"] == 8
    with pytest.raises(CheckpointError, match="rank 8 is above the maximum rank 4"):
        check_vllm_adapter(base, folder, max_rank=4)
    edit_config(folder, rank_pattern={})  # the file's v_proj matrices are rank 8, the config now says 4
    with pytest.raises(CheckpointError, match=r"v_proj's LoRA .* at rank 4"):
        check_vllm_adapter(base, folder)


def test_a_module_the_base_lacks_fails_with_close_names(base, good, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy(good, tmp_path)
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v
               for k, v in load_file(path).items()}
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model.layers.7.self_attn.q_proj, which the base model does not have"):
        check_vllm_adapter(base, folder)


def test_a_truncated_adapter_file_fails(base, good, tmp_path):
    folder = copy(good, tmp_path)
    path = os.path.join(folder, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="adapter weights: .* is truncated or corrupt"):
        check_vllm_adapter(base, folder)


def test_missing_and_corrupt_files_fail(base, good, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_vllm_adapter(base, tmp_path / "nowhere")
    folder = copy(good, tmp_path, "a")
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="neither adapter_model.safetensors"):
        check_vllm_adapter(base, folder)
    folder = copy(good, tmp_path, "b")
    open(os.path.join(folder, "adapter_config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="adapter config: .* not readable JSON"):
        check_vllm_adapter(base, folder)
    broken_base = copy(base, tmp_path, "base")
    path = os.path.join(broken_base, "model.safetensors")
    open(path, "wb").write(open(path, "rb").read()[:50])
    with pytest.raises(CheckpointError, match="base model weights: .* truncated or corrupt"):
        check_vllm_adapter(broken_base, good)
    with pytest.raises(CheckpointError, match="base model folder .* does not exist"):
        check_vllm_adapter(tmp_path / "no-base", good)


def test_sharded_base_is_read_through_its_index(good, tmp_path):
    base = tmp_path / "sharded"
    tiny_llama().save_pretrained(base, max_shard_size="20KB")
    assert os.path.isfile(base / "model.safetensors.index.json")
    assert check_vllm_adapter(base, good)["modules"] == 14


def test_vllm_command_lists_every_adapter(tmp_path):
    adapters = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "c,d": str(tmp_path / "x,y")}
    argv = vllm_command(tmp_path / "base", adapters, host="127.0.0.1", port=8123, max_loras=4, max_lora_rank=16,
                        extra_args=["--dtype", "float32"], python="/venv/bin/python")
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "base")
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--max-loras") + 1] == "4"
    assert argv[argv.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in argv
    start = argv.index("--lora-modules") + 1
    assert argv[start:start + 3] == [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}",
                                     json.dumps({"name": "c,d", "path": str(tmp_path / "x,y")})]
    assert argv[-2:] == ["--dtype", "float32"]


@pytest.mark.parametrize("kwargs, message", [
    ({"adapters": {}}, "at least one adapter"),
    ({"max_lora_rank": 12}, "vLLM accepts one of"),
    ({"max_loras": 0}, "max_loras"),
    ({"port": 70000}, "port"),
    ({"extra_args": "--dtype float32"}, "list of arguments"),
    ({"adapters": {" a": "x"}}, "surrounding spaces"),
])
def test_vllm_command_rejects_bad_arguments(kwargs, message):
    args = {"base_path": "base", "adapters": {"a": "x"}, **kwargs}
    with pytest.raises(ConfigError, match=message):
        vllm_command(**args)


def test_smallest_max_lora_rank():
    assert [smallest_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    assert VLLM_MAX_LORA_RANKS[-1] == 512
    with pytest.raises(ConfigError, match="largest"):
        smallest_max_lora_rank(513)


def test_serve_with_vllm_checks_prints_and_runs_the_command(base, good, tmp_path, monkeypatch, capsys):
    """The hand-over runs ``python -m vllm.entrypoints.openai.api_server ...``: here a stand-in
    ``vllm`` package on PYTHONPATH that records the argv it was started with."""
    fake = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    fake.mkdir(parents=True)
    for folder in (fake.parent.parent, fake.parent, fake):
        (folder / "__init__.py").write_text("")
    record = tmp_path / "argv.json"
    script = f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(3)\n"
    (fake / "api_server.py").write_text(script)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    assert serve_with_vllm(base, {"g": good}, port=8124, dry_run=True) == 0
    assert not record.exists()
    printed = capsys.readouterr()
    assert "g: LoRA r=8" in printed.err and "--lora-modules" in printed.out
    assert serve_with_vllm(base, {"g": good}, port=8124, python=sys.executable) == 3
    argv = json.loads(record.read_text())
    assert argv[argv.index("--lora-modules") + 1] == f"g={good}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8" and argv[argv.index("--port") + 1] == "8124"


def test_serve_with_vllm_checks_every_adapter_before_starting(base, good, tmp_path):
    ia3 = save_adapter(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[]), tmp_path / "ia3")
    with pytest.raises(CheckpointError, match="IA3 adapter"):
        serve_with_vllm(base, {"g": good, "bad": ia3}, python="/nonexistent/python")
