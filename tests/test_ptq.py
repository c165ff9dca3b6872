"""Post-training int8 dynamic quantization for CPU deployment (peftkit.quant.dynamic, `peftkit quantize`).

The reference is the format's definition (see peftkit/quant/dynamic.py): per output channel
``s_o = max|W[o]| / 127.5``, ``Q = clamp(round(W · (1/s)), -128, 127)``; per token
``a_t = max|x[t]| / 127.5``, ``q = clamp(round(x · (1/a)), -128, 127)``; ``y = a_t s_o Σ q Q + b``.
On the bundled model the logits' relative error measured 1.2 % (worst token 6.7 %) and the top-1
token agreed on 97 % of the positions of a batch of E2E texts; the tests assert < 5 % and > 90 %.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

import peftkit  # noqa: E402
from peftkit import LoraConfig, PeftkitError, get_peft_model, quantize_model, save_quantized  # noqa: E402
from peftkit.cli import main  # noqa: E402
from peftkit.errors import CheckpointError, ConfigError  # noqa: E402
from peftkit.quant.dynamic import (  # noqa: E402
    MARKER_NAME,
    is_dynamic_int8,
    latency,
    load_dynamic_int8,
    quantize_dynamic_int8,
    read_marker,
    save_dynamic_int8,
)

from .models import tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402

TEXTS = [
    "name[The Eagle], eatType[coffee shop], food[French]\nThe Eagle is a coffee shop that serves French food.",
    "Once upon a time there was a little girl named Lily. She loved to play outside.",
    "Tom had a red ball. He liked to throw it to his dog, who ran fast to get it back.",
    "name[Zizzi], priceRange[cheap], area[riverside]\nZizzi is a cheap place by the riverside.",
]


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(k, type(m)) for k, m in model.named_modules()]


def _assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[tuple[str, type]]]) -> None:
    state, kinds = snap
    assert [(k, type(m)) for k, m in model.named_modules()] == kinds
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert type(now[k]) is type(v) and torch.equal(now[k], v), k


@pytest.fixture(scope="module")
def bundled():
    model, tok = peftkit.load_model()
    tok.pad_token = tok.eos_token
    return model.eval(), tok


@pytest.fixture(scope="module")
def batch(bundled):
    _, tok = bundled
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def int8_model(bundled):
    model = copy.deepcopy(bundled[0])
    report = quantize_dynamic_int8(model)
    return model, report


@pytest.fixture(scope="module")
def int8_folder(int8_model, bundled, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ptq") / "int8"
    save_dynamic_int8(int8_model[0], folder, tokenizer=bundled[1])
    return folder


# ---------------------------------------------------------------------------------------------
# the math


def test_linear_matches_the_definition():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    model = nn.Sequential(lin)
    ref_model = copy.deepcopy(model)
    report = quantize_dynamic_int8(model)
    assert report.quantized == ("0",) and report.skipped == {}
    W, b = ref_model[0].weight.detach(), ref_model[0].bias.detach()
    s = W.abs().amax(1) / 127.5
    Q = torch.clamp(torch.round(W * (1.0 / s[:, None])), -128, 127)
    weight = model[0].weight
    assert torch.equal(weight.qdata.float(), Q) and weight.qdata.dtype == torch.int8
    torch.testing.assert_close(weight.scale.flatten(), s)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    a = x.abs().amax(-1, keepdim=True) / 127.5
    q = torch.clamp(torch.round(x * (1.0 / a)), -128, 127)
    ref = (q @ Q.T) * a * s + b
    with torch.no_grad():
        out = model(x)
        exact = ref_model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert float((out - exact).abs().max()) > 1e-4  # it is quantized, not the float layer
    assert report.float_bytes == 24 * 10 * 4 and report.int8_bytes < report.float_bytes / 3


def test_bundled_model_is_close_to_float(bundled, batch, int8_model):
    model, report = int8_model
    assert len(report.quantized) == 5 * 7 and "lm_head" in report.skipped
    assert all(type(model.get_submodule(k).weight).__name__ == "Int8Tensor" for k in report.quantized)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head stays float and tied
    with torch.no_grad():
        ref = bundled[0](**batch).logits
        out = model(**batch).logits
    mask = batch["attention_mask"].bool()
    ref, out = ref[mask], out[mask]
    rel = float((out - ref).norm() / ref.norm())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    assert 1e-4 < rel < 0.05, rel
    assert top1 > 0.9, top1
    assert report.int8_bytes < 0.3 * report.float_bytes


def test_skip_modules_stay_float(bundled, batch):
    model = copy.deepcopy(bundled[0])
    report = quantize_dynamic_int8(model, skip_modules=["lm_head", "mlp"])
    assert len(report.quantized) == 5 * 4
    for i in range(5):
        up = model.model.layers[i].mlp.up_proj
        assert type(up.weight) is nn.Parameter
        assert torch.equal(up.weight, bundled[0].model.layers[i].mlp.up_proj.weight)
        assert report.skipped[f"model.layers.{i}.mlp.up_proj"] == "skip_modules 'mlp'"
    one = copy.deepcopy(bundled[0])
    assert len(quantize_dynamic_int8(one, skip_modules="layers.1").quantized) == 4 * 7  # whole components


def test_bert_classifier_and_untied_head(bundled):
    model = tiny_bert_cls()
    report = quantize_dynamic_int8(model, skip_modules=())
    assert "classifier" in report.quantized and is_dynamic_int8(model)
    untied = tiny_llama()
    assert "lm_head" in quantize_dynamic_int8(untied, skip_modules=()).quantized  # not tied: quantized
    tied = copy.deepcopy(bundled[0])
    report = quantize_dynamic_int8(tied, skip_modules=())
    assert report.skipped == {"lm_head": "weight tied to model.embed_tokens.weight"}


# ---------------------------------------------------------------------------------------------
# refusals leave the model as it was


def test_refuses_adapter_layers_and_peft_models(bundled):
    peft = get_peft_model(copy.deepcopy(bundled[0]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snap = _snapshot(peft)
    with pytest.raises(PeftkitError, match="merge_and_unload"):
        quantize_dynamic_int8(peft)
    _assert_unchanged(peft, snap)
    inner = peft.base_model.model  # the wrapped transformers model: still has LoRA layers
    with pytest.raises(PeftkitError, match="adapter layers"):
        quantize_dynamic_int8(inner)
    _assert_unchanged(peft, snap)
    merged = peft.merge_and_unload()
    assert len(quantize_dynamic_int8(merged).quantized) == 35  # merged: accepted


@pytest.mark.parametrize("bits", [8, 4])
def test_refuses_a_qlora_base(bundled, bits):
    model = quantize_model(copy.deepcopy(bundled[0]), bits=bits, block_size=4)
    snap = _snapshot(model)
    with pytest.raises(PeftkitError, match="already quantized for QLoRA.*dequantize_model"):
        quantize_dynamic_int8(model)
    _assert_unchanged(model, snap)


def test_refuses_twice_bad_skip_modules_and_no_linear(int8_model, bundled):
    with pytest.raises(PeftkitError, match="already quantized"):
        quantize_dynamic_int8(int8_model[0])
    model = copy.deepcopy(bundled[0])
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match="matches no module.*did you mean"):
        quantize_dynamic_int8(model, skip_modules=["lm_head", "mlpp"])
    with pytest.raises(ConfigError, match="module name"):
        quantize_dynamic_int8(model, skip_modules=[3])
    with pytest.raises(ConfigError, match="module name"):
        quantize_dynamic_int8(model, skip_modules=7)
    with pytest.raises(PeftkitError, match="no nn.Linear.*skip_modules 'model'"):
        quantize_dynamic_int8(model, skip_modules="model")
    _assert_unchanged(model, snap)
    gpt2 = tiny_gpt2()
    snap = _snapshot(gpt2)
    with pytest.raises(PeftkitError, match="Conv1D"):
        quantize_dynamic_int8(gpt2)
    _assert_unchanged(gpt2, snap)
    with pytest.raises(PeftkitError, match="nn.Module"):
        quantize_dynamic_int8("model")


# ---------------------------------------------------------------------------------------------
# the folder


def test_folder_reloads_exactly(int8_model, int8_folder, batch):
    model = int8_model[0]
    names = sorted(os.listdir(int8_folder))
    assert {"config.json", "model.safetensors", MARKER_NAME, "generation_config.json", "tokenizer.json"} <= set(names)
    marker = read_marker(int8_folder)
    assert marker["library"] == "torchao" and marker["format"] == "int8-dynamic"
    assert sorted(marker["quantized_modules"]) == sorted(int8_model[1].quantized)
    reloaded = load_dynamic_int8(int8_folder)
    assert not reloaded.training and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(int8_folder)  # transformers alone reads the folder
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, model(**batch).logits)
    float_bytes = os.path.getsize(peftkit.assets.model_path() / "model.safetensors")
    assert os.path.getsize(int8_folder / "model.safetensors") < 0.5 * float_bytes


def test_folder_with_float_modules_reloads_exactly(bundled, batch, tmp_path):
    model = copy.deepcopy(bundled[0])
    quantize_dynamic_int8(model, skip_modules=["lm_head", "layers.0"])
    save_dynamic_int8(model, tmp_path / "m")
    reloaded = load_dynamic_int8(tmp_path / "m")
    assert type(reloaded.model.layers[0].self_attn.q_proj.weight) is nn.Parameter
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    save_dynamic_int8(reloaded, tmp_path / "m")  # an earlier such folder may be written again


def test_load_refuses_other_folders(bundled, tmp_path, int8_folder):
    with pytest.raises(CheckpointError, match="float model.*quantize"):
        load_dynamic_int8(peftkit.assets.model_path())
    qlora = quantize_model(copy.deepcopy(bundled[0]), bits=8)
    save_quantized(qlora, tmp_path / "qlora")
    with pytest.raises(CheckpointError, match="load_quantized"):
        load_dynamic_int8(tmp_path / "qlora")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_dynamic_int8(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_dynamic_int8(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for name in os.listdir(int8_folder):
        (other / name).write_bytes((int8_folder / name).read_bytes())
    (other / MARKER_NAME).write_text(json.dumps({"format": "int4-weight-only"}))
    with pytest.raises(CheckpointError, match="int4-weight-only"):
        load_dynamic_int8(other)
    (other / MARKER_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_dynamic_int8(other)
    (other / MARKER_NAME).write_bytes((int8_folder / MARKER_NAME).read_bytes())
    (other / "model.safetensors").write_bytes((int8_folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_dynamic_int8(other)
    os.remove(other / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_dynamic_int8(other)


def test_save_refuses(bundled, int8_model, tmp_path):
    with pytest.raises(PeftkitError, match="quantize it first"):
        save_dynamic_int8(bundled[0], tmp_path / "f")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_dynamic_int8(int8_model[0], tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]
    plain = nn.Sequential(nn.Linear(8, 8))
    quantize_dynamic_int8(plain)
    with pytest.raises(PeftkitError, match="transformers config"):
        save_dynamic_int8(plain, tmp_path / "g")
    assert not os.path.exists(tmp_path / "f") and not os.path.exists(tmp_path / "g")


def test_latency_checks_its_arguments(int8_model, batch):
    assert latency(int8_model[0], batch, repeats=1, warmup=0) > 0
    assert latency(int8_model[0], batch["input_ids"], repeats=2) > 0
    for bad in ({"repeats": 0}, {"repeats": True}, {"warmup": -1}):
        with pytest.raises(ConfigError):
            latency(int8_model[0], batch, **bad)


# ---------------------------------------------------------------------------------------------
# peftkit quantize


def test_cli_writes_folder_and_report(tmp_path, capsys, batch):
    out = tmp_path / "q"
    argv = ["quantize", "--int8", "--output-dir", str(out), "--repeats", "1", "--max-samples", "6",
            "--batch-size", "2", "--max-length", "128"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "size on disk" in text and "eval loss" in text
    report = json.loads((out / "report.json").read_text())
    assert report["quantized_modules"] == 35 and report["parameters"] == 260032
    assert report["weights_bytes"]["int8"] == os.path.getsize(out / "model.safetensors")
    assert report["weights_bytes"]["float"] == os.path.getsize(peftkit.assets.model_path() / "model.safetensors")
    assert report["latency_batch"] == [2, 128] and report["latency_s"]["float"] > 0 and report["latency_s"]["int8"] > 0
    assert report["eval_examples"] == 6 and report["eval_data"].endswith("e2e_nlg_eval.jsonl")
    loss = report["eval_loss"]
    assert loss["float"] != loss["int8"] and abs(loss["int8"] - loss["float"]) < 0.05 * loss["float"]
    reference = copy.deepcopy(peftkit.load_model()[0].eval())
    quantize_dynamic_int8(reference)
    with torch.no_grad():  # the folder holds exactly the bundled model quantized
        assert torch.equal(load_dynamic_int8(out)(**batch).logits, reference(**batch).logits)
    assert main(argv) == 2  # the folder is not empty now
    assert "not empty" in capsys.readouterr().err


def test_cli_data_file_and_skip_modules(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "q"
    assert main(["quantize", str(peftkit.assets.model_path()), "--int8", "--output-dir", str(out), "--data",
                 str(data), "--skip-modules", "lm_head", "down_proj", "--repeats", "1", "--batch-size", "2",
                 "--max-length", "16", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantized_modules"] == 30 and report["eval_examples"] >= 4 and report["threads"] == 1
    assert report["skipped_modules"]["model.layers.0.mlp.down_proj"] == "skip_modules 'down_proj'"


def test_cli_refusals_leave_nothing(tmp_path, capsys, bundled):
    out = tmp_path / "q"
    cases = [
        (["quantize", "--output-dir", str(out)], "--int8"),
        (["quantize", str(tmp_path / "nowhere"), "--int8", "--output-dir", str(out)], "does not exist"),
        (["quantize", "--int8", "--output-dir", str(out), "--data", str(tmp_path / "x.jsonl")], "does not exist"),
        (["quantize", "--int8", "--output-dir", str(out), "--skip-modules", "mlpp", "--repeats", "1",
          "--max-samples", "1"], "matches no module"),
    ]
    adapter = tmp_path / "adapter"
    get_peft_model(copy.deepcopy(bundled[0]), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    cases.append((["quantize", str(adapter), "--int8", "--output-dir", str(out)], "adapter folder; merge"))
    qlora = tmp_path / "qlora"
    save_quantized(quantize_model(copy.deepcopy(bundled[0]), bits=8), qlora)
    cases.append((["quantize", str(qlora), "--int8", "--output-dir", str(out)], "already quantized"))
    (tmp_path / "file").write_text("x")
    cases.append((["quantize", "--int8", "--output-dir", str(tmp_path / "file")], "is a file"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "file", "qlora"]  # no staging folder left behind


def test_cli_help(capsys):
    assert main([]) == 0 and "quantize" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--help"])
    assert exc.value.code == 0 and "usage: peftkit quantize" in capsys.readouterr().out


def test_cli_quantizes_a_merged_model_folder(tmp_path, bundled, batch):
    from .models import randomize_adapters

    model, tok = bundled
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(peft, std=0.2)
    merged = peft.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "merged"), "--int8", "--output-dir", str(out), "--repeats", "1",
                 "--batch-size", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_data"] is None and report["eval_loss"] == {"float": None, "int8": None}  # no --data
    quantize_dynamic_int8(merged)
    with torch.no_grad():  # the folder holds the merged model (not the bundled one) quantized
        reloaded = load_dynamic_int8(out)(**batch).logits
        assert torch.equal(reloaded, merged(**batch).logits)
        assert not torch.allclose(reloaded, _bundled_int8_logits(batch), atol=1e-3)


def _bundled_int8_logits(batch):
    model = peftkit.load_model()[0].eval()
    quantize_dynamic_int8(model)
    return model(**batch).logits
