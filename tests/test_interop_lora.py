"""Interop with Hugging Face PEFT (a test-only dependency): LoRA adapter folders cross-load both ways.

For every setting below:

* a folder written by ``peftkit`` loads with ``peft.PeftModel.from_pretrained`` and gives the same
  outputs (fp32, atol 1e-5), and every tensor of the file lands in the HF model;
* a folder written by ``peft`` loads with ``peftkit.PeftModel.from_pretrained`` and gives the same
  outputs, with no tensor ignored;
* ``adapter_config.json`` has exactly the key set of ``peft.LoraConfig(...).to_dict()`` and the same
  values as HF writes (up to HF's documented normalisations);
* ``adapter_model.safetensors`` has the same tensor keys, shapes and dtypes in both libraries.

Adapter tensors (and ``modules_to_save`` copies) are randomized before saving, so a no-op load
cannot pass. Models are tiny, built in-process with fixed seeds.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit

from .models import CNN, MLP, _tokens, randomize_adapters, tiny_bert_cls, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", minversion="0.21")

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# settings


def _ids_inputs() -> dict[str, Any]:
    return {"input_ids": _tokens(3, 7, 64)}


def _mlp_inputs() -> dict[str, Any]:
    return {"x": torch.randn(3, 10, generator=torch.Generator().manual_seed(2))}


def _seeded(cls: Callable[..., nn.Module], **kw: Any) -> Callable[[], nn.Module]:
    """A builder giving the same weights on every call (custom modules draw from the global RNG)."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(**kw).eval()

    return build


def _cnn_inputs() -> dict[str, Any]:
    return {"x": torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2)), "tokens": _tokens(3, 5, 30)}


@dataclass
class Setting:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    config: dict[str, Any]  # LoraConfig kwargs, identical for both libraries

    def __repr__(self) -> str:
        return self.name


SETTINGS = [
    Setting("llama_all_linear_gqa", tiny_llama, _ids_inputs,
            dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")),
    Setting("rslora", tiny_llama, _ids_inputs,
            dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                 task_type="CAUSAL_LM")),
    Setting("dora_linear", _seeded(MLP, bias=True), _mlp_inputs,
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=["lin0", "lin1", "lin2"])),
    Setting("dora_gpt2_conv1d", tiny_gpt2, _ids_inputs,
            dict(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"],
                 task_type="CAUSAL_LM")),
    Setting("dora_conv2d", _seeded(CNN), _cnn_inputs,
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=["conv2d", "conv2d_1x1"])),
    Setting("embedding", _seeded(CNN), _cnn_inputs,
            dict(r=4, lora_alpha=8, target_modules=["emb"])),
    Setting("conv1d_conv2d", _seeded(CNN), _cnn_inputs,
            dict(r=4, lora_alpha=8, target_modules=["conv1d", "conv2d", "conv2d_1x1"])),
    Setting("rank_alpha_pattern", tiny_llama, _ids_inputs,
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                 rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                 alpha_pattern={"k_proj": 32, "o_proj": 3}, task_type="CAUSAL_LM")),
    Setting("modules_to_save_bert_seq_cls", tiny_bert_cls, _ids_inputs,
            dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    Setting("modules_to_save_mlp", _seeded(MLP), _mlp_inputs,
            dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["lin2"])),
    Setting("gpt2_conv1d_fan_in_fan_out", tiny_gpt2, _ids_inputs,
            dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"],
                 task_type="CAUSAL_LM")),
    Setting("lora_bias", _seeded(MLP, bias=True), _mlp_inputs,
            dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["lin0", "lin1", "lin2"])),
    Setting("lora_bias_conv", _seeded(CNN), _cnn_inputs,
            dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["conv1d", "conv2d", "head"])),
    Setting("dora_embedding_conv1d", _seeded(CNN), _cnn_inputs,
            dict(r=4, lora_alpha=8, use_dora=True, target_modules=["emb", "conv1d"])),
    Setting("bias_lora_only", _seeded(MLP), _mlp_inputs,
            dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["lin0", "lin1"])),
    Setting("bias_all", _seeded(MLP), _mlp_inputs,
            dict(r=4, lora_alpha=8, bias="all", target_modules=["lin0"])),
]


@pytest.fixture(params=SETTINGS, ids=lambda s: s.name)
def setting(request) -> Setting:
    return request.param


# ---------------------------------------------------------------------------------------------
# helpers


def _randomize(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero values for every adapter tensor and every modules_to_save copy, and for the biases
    an adapter with ``bias != "none"`` saves; never for the rest of the base."""
    bias = next(iter(model.peft_config.values())).bias
    randomize_adapters(model, seed, std, is_adapter=lambda name: (
        "lora_" in name or ".modules_to_save." in name or bias == "all" and name.endswith(".bias")
        or bias == "lora_only" and name.endswith(".base_layer.bias")))


def _run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _hf_config(kw: dict[str, Any]):
    return peft.LoraConfig(**kw)


def _kit_config(kw: dict[str, Any]):
    return peftkit.LoraConfig(**kw)


def _file_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _file_config(folder) -> dict[str, Any]:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _hf_load(build, folder, **kw):
    """peft.PeftModel.from_pretrained, failing on HF's "missing adapter keys" warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build(), folder, **kw)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return model.eval()


def _kit_load(build, folder, **kw):
    """peftkit.PeftModel.from_pretrained, failing on any PeftkitWarning (ignored tensors, unknown fields)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftkit.PeftModel.from_pretrained(build(), folder, **kw)
    bad = [str(w.message) for w in caught if issubclass(w.category, peftkit.PeftkitWarning)]
    assert not bad, bad
    return model.eval()


def _hf_save(model, folder, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kw)


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].float(), b[k].float()), k


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max().item()


# ---------------------------------------------------------------------------------------------
# (a) peftkit -> Hugging Face PEFT


def test_peftkit_folder_loads_in_hf(setting, tmp_path):
    inputs = setting.inputs()
    base = setting.build()
    base_out = _run(base, inputs)
    pm = peftkit.get_peft_model(base, _kit_config(setting.config)).eval()
    _randomize(pm)
    ref = _run(pm, inputs)
    assert not torch.allclose(ref, base_out, atol=1e-3), "the adapter must change the output"
    pm.save_pretrained(tmp_path)

    hf = _hf_load(setting.build, tmp_path)
    # every tensor in the file reached the HF model, unchanged
    _assert_same_tensors(peft.get_peft_model_state_dict(hf), _file_tensors(tmp_path))
    _assert_close(_run(hf, inputs), ref)


# ---------------------------------------------------------------------------------------------
# (b) Hugging Face PEFT -> peftkit


def test_hf_folder_loads_in_peftkit(setting, tmp_path):
    inputs = setting.inputs()
    base = setting.build()
    base_out = _run(base, inputs)
    hf = peft.get_peft_model(base, _hf_config(setting.config)).eval()
    _randomize(hf)
    ref = _run(hf, inputs)
    assert not torch.allclose(ref, base_out, atol=1e-3), "the adapter must change the output"
    _hf_save(hf, tmp_path)

    pm = _kit_load(setting.build, tmp_path)
    _assert_same_tensors(peftkit.get_peft_model_state_dict(pm), _file_tensors(tmp_path))
    _assert_close(_run(pm, inputs), ref)


# ---------------------------------------------------------------------------------------------
# file format: config keys and values, tensor keys and shapes


def _save_both(setting: Setting, tmp_path):
    kit_dir, hf_dir = tmp_path / "peftkit", tmp_path / "hf"
    pm = peftkit.get_peft_model(setting.build(), _kit_config(setting.config))
    pm.save_pretrained(kit_dir)
    hf = peft.get_peft_model(setting.build(), _hf_config(setting.config))
    _hf_save(hf, hf_dir)
    return pm, hf, kit_dir, hf_dir


def test_adapter_config_matches_hf(setting, tmp_path):
    _, _, kit_dir, hf_dir = _save_both(setting, tmp_path)
    kit, hf = _file_config(kit_dir), _file_config(hf_dir)
    expected_keys = set(_hf_config(setting.config).to_dict())
    assert set(kit) == expected_keys, (set(kit) ^ expected_keys)
    assert set(kit) == set(hf)
    for key in sorted(kit):
        if key == "target_modules":
            if setting.config["target_modules"] == "all-linear":
                # HF writes the expanded module paths, peftkit keeps "all-linear"; both load in either library
                assert kit[key] == "all-linear"
            else:
                assert sorted(kit[key]) == sorted(hf[key])  # HF stores a set: order not deterministic
        elif key == "modules_to_save" and setting.config.get("task_type") == "SEQ_CLS":
            # HF adds every task head name ("classifier", "score"); peftkit those the model has
            assert kit[key] and set(kit[key]) <= set(hf[key]) <= {"classifier", "score"}
        else:
            assert kit[key] == hf[key], f"{key}: peftkit {kit[key]!r} != HF {hf[key]!r}"
    assert kit["inference_mode"] is True


def test_safetensors_keys_and_shapes_match_hf(setting, tmp_path):
    pm, hf, kit_dir, hf_dir = _save_both(setting, tmp_path)
    kit, ref = _file_tensors(kit_dir), _file_tensors(hf_dir)
    assert sorted(kit) == sorted(ref), (set(kit) ^ set(ref))
    for k in kit:
        assert kit[k].shape == ref[k].shape, k
        assert kit[k].dtype == ref[k].dtype, k
    assert sorted(os.listdir(kit_dir)) == sorted(os.listdir(hf_dir))
    # in memory, the adapter parameters carry the same names too
    names = lambda m: sorted(n for n, _ in m.named_parameters() if "lora_" in n or ".modules_to_save." in n)  # noqa: E731
    assert names(pm) == names(hf)


# ---------------------------------------------------------------------------------------------
# LoRA on a transformers model's embed_tokens; save_embedding_layers; resized vocabularies


def test_llama_embed_tokens_cross_load(tmp_path):
    """Outputs match both ways, and both libraries write the same keys: with the default
    ``save_embedding_layers="auto"`` a targeted ``embed_tokens`` adds the full base embedding
    (``...embed_tokens.base_layer.weight``) to the file."""
    kw = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    inputs = _ids_inputs()
    pm = peftkit.get_peft_model(tiny_llama(), _kit_config(kw)).eval()
    _randomize(pm)
    ref = _run(pm, inputs)
    with pytest.warns(peftkit.PeftkitWarning, match="save_embedding_layers"):
        pm.save_pretrained(tmp_path / "kit")
    _assert_close(_run(_hf_load(tiny_llama, tmp_path / "kit"), inputs), ref)

    hf = peft.get_peft_model(tiny_llama(), _hf_config(kw)).eval()
    _randomize(hf, seed=1)
    ref = _run(hf, inputs)
    _hf_save(hf, tmp_path / "hf")
    theirs = _file_tensors(tmp_path / "hf")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in theirs
    assert sorted(_file_tensors(tmp_path / "kit")) == sorted(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftkitWarning)  # every key is understood
        loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "hf").eval()
    _assert_close(_run(loaded, inputs), ref)
    pm.save_pretrained(tmp_path / "lean", save_embedding_layers=False)
    assert not any("base_layer" in k for k in _file_tensors(tmp_path / "lean"))


def _resized(folder, vocab, seed):
    """The base model from ``folder`` with its vocabulary grown to ``vocab`` (new rows random per seed)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


@pytest.mark.parametrize("writer", ["peftkit", "peft"])
def test_resized_vocabulary_saves_the_embeddings(tmp_path, writer):
    """A LoRA adapter (not on the embeddings) trained after ``resize_token_embeddings``: "auto"
    sees the vocabulary differ from the base model's config.json and saves the input and output
    embeddings, so a base resized with other random rows gives the same outputs after loading,
    in either library."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lib, cfg = (peftkit, _kit_config) if writer == "peftkit" else (peft, _hf_config)
    model = lib.get_peft_model(_resized(base_dir, 70, seed=1), cfg(kw)).eval()
    _randomize(model)
    inputs = {"input_ids": torch.tensor([[65, 3, 69, 7, 66]])}  # new token ids among them
    ref = _run(model, inputs)
    if writer == "peftkit":
        with pytest.warns(peftkit.PeftkitWarning, match="vocabulary differs"):
            model.save_pretrained(tmp_path / "adapter")
    else:
        _hf_save(model, tmp_path / "adapter")
    keys = set(_file_tensors(tmp_path / "adapter"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    fresh = lambda: _resized(base_dir, 70, seed=2)  # noqa: E731 - other random rows
    with torch.no_grad():
        assert not torch.allclose(fresh().get_input_embeddings().weight, _resized(base_dir, 70, 1).get_input_embeddings().weight)
    _assert_close(_run(peftkit.PeftModel.from_pretrained(fresh(), tmp_path / "adapter").eval(), inputs), ref)
    _assert_close(_run(_hf_load(fresh, tmp_path / "adapter"), inputs), ref)


def test_embedding_weights_of_the_wrong_size_fail_before_loading(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    kw = dict(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    pm = peftkit.get_peft_model(_resized(base_dir, 70, seed=1), _kit_config(kw))
    with pytest.warns(peftkit.PeftkitWarning):
        pm.save_pretrained(tmp_path / "adapter")
    model = _resized(base_dir, 64, seed=1)  # the vocabulary was not resized
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.CheckpointError, match=r"resize_token_embeddings\(70\)"):
        peftkit.PeftModel.from_pretrained(model, tmp_path / "adapter")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    with pytest.raises(peftkit.CheckpointError, match="save_embedding_layers"):
        pm.save_pretrained(tmp_path / "other", save_embedding_layers="yes")


# ---------------------------------------------------------------------------------------------
# several adapters in one folder


MULTI = {
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "second": dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"],
                   task_type="CAUSAL_LM"),
    "third": dict(r=6, lora_alpha=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
}


def _outputs_per_adapter(model, names, inputs) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        model.set_adapter(name)
        out[name] = _run(model, inputs)
    return out


def _build_multi(lib, config_cls):
    model = lib.get_peft_model(tiny_llama(), config_cls(MULTI["default"]))
    for name in ("second", "third"):
        model.add_adapter(name, config_cls(MULTI[name]))
    model.eval()
    _randomize(model, seed=3)
    return model


def _adapter_files(folder) -> list[str]:
    """The entries of a save folder other than the model card (HF writes README.md once, at the top;
    peftkit writes one into each adapter folder)."""
    return sorted(n for n in os.listdir(folder) if n != "README.md")


def _check_multi_layout(folder) -> None:
    assert {"adapter_config.json", "adapter_model.safetensors", "second", "third"} <= set(os.listdir(folder))
    for sub in ("second", "third"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder / sub))


def test_multi_adapter_folder_peftkit_to_hf(tmp_path):
    inputs = _ids_inputs()
    pm = _build_multi(peftkit, _kit_config)
    refs = _outputs_per_adapter(pm, list(MULTI), inputs)
    assert not torch.allclose(refs["default"], refs["second"], atol=1e-3)
    pm.save_pretrained(tmp_path / "all")
    _check_multi_layout(tmp_path / "all")

    hf = _hf_load(tiny_llama, tmp_path / "all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.load_adapter(tmp_path / "all" / "second", adapter_name="second")
        hf.load_adapter(tmp_path / "all", adapter_name="third", subfolder="third")
    for name in MULTI:
        folder = tmp_path / "all" if name == "default" else tmp_path / "all" / name
        _assert_same_tensors(peft.get_peft_model_state_dict(hf, adapter_name=name), _file_tensors(folder))
    got = _outputs_per_adapter(hf, list(MULTI), inputs)
    for name in MULTI:
        _assert_close(got[name], refs[name])

    # selected_adapters without "default": only the sub-folder is written; it loads under any name
    pm.save_pretrained(tmp_path / "sel", selected_adapters=["second"])
    assert _adapter_files(tmp_path / "sel") == ["second"]
    hf2 = _hf_load(tiny_llama, tmp_path / "sel" / "second", adapter_name="renamed")
    assert hf2.active_adapter == "renamed"
    _assert_close(_run(hf2, inputs), refs["second"])


def test_multi_adapter_folder_hf_to_peftkit(tmp_path):
    inputs = _ids_inputs()
    hf = _build_multi(peft, _hf_config)
    refs = _outputs_per_adapter(hf, list(MULTI), inputs)
    assert not torch.allclose(refs["default"], refs["second"], atol=1e-3)
    _hf_save(hf, tmp_path / "all")
    _check_multi_layout(tmp_path / "all")

    pm = _kit_load(tiny_llama, tmp_path / "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftkitWarning)
        pm.load_adapter(tmp_path / "all" / "second", adapter_name="second")
        pm.load_adapter(tmp_path / "all", adapter_name="third", subfolder="third")
    for name in MULTI:
        folder = tmp_path / "all" if name == "default" else tmp_path / "all" / name
        _assert_same_tensors(peftkit.get_peft_model_state_dict(pm, adapter_name=name), _file_tensors(folder))
    got = _outputs_per_adapter(pm, list(MULTI), inputs)
    for name in MULTI:
        _assert_close(got[name], refs[name])

    _hf_save(hf, tmp_path / "sel", selected_adapters=["second"])
    assert _adapter_files(tmp_path / "sel") == ["second"]
    pm2 = _kit_load(tiny_llama, tmp_path / "sel" / "second", adapter_name="renamed")
    assert pm2.active_adapter == "renamed"
    _assert_close(_run(pm2, inputs), refs["second"])


def test_multi_adapter_configs_and_tensors_match_hf(tmp_path):
    pm = _build_multi(peftkit, _kit_config)
    hf = _build_multi(peft, _hf_config)
    pm.save_pretrained(tmp_path / "kit")
    _hf_save(hf, tmp_path / "hf")
    for sub in ("", "second", "third"):
        kit_dir, hf_dir = tmp_path / "kit" / sub, tmp_path / "hf" / sub
        kit, ref = _file_tensors(kit_dir), _file_tensors(hf_dir)
        assert sorted(kit) == sorted(ref)
        assert all(kit[k].shape == ref[k].shape for k in kit)
        kc, hc = _file_config(kit_dir), _file_config(hf_dir)
        assert set(kc) == set(hc)
        for key in ("r", "lora_alpha", "use_rslora", "task_type", "peft_type"):
            assert kc[key] == hc[key], (sub, key)
        assert sorted(kc["target_modules"]) == sorted(hc["target_modules"])
