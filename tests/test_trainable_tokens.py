"""Trainable tokens: the TRAINABLE_TOKENS method, LoraConfig.trainable_token_indices and tied embeddings.

Every model is a tiny LlamaForCausalLM built in-process, once with tied input/output embeddings
(``tie_word_embeddings=True``) and once untied. The reference of an adapter is the base model with the
chosen rows of its embedding table (and so of a tied head) overwritten by the adapter's values.
Interop: folders written by peftkit load in Hugging Face PEFT with identical logits, and the reverse.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import (
    ConfigError,
    LoraConfig,
    MergeError,
    PeftkitError,
    PeftModel,
    TargetError,
    TrainableTokensConfig,
    TrainableTokensLayer,
    TrainableTokensWrapper,
    get_peft_model,
    get_peft_model_state_dict,
)

IDX = [1, 5, 7]
X = torch.tensor([[1, 2, 5, 7, 9], [7, 7, 3, 1, 0]])
ATOL = 1e-5


def tiny(tie: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def logits(model: torch.nn.Module, x: torch.Tensor = X, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def reference(tie: bool, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """The base model with embedding rows replaced (a tied head sees them too)."""
    model = tiny(tie)
    with torch.no_grad():
        for i, v in rows.items():
            model.model.embed_tokens.weight[i] = v
    return logits(model)


def train_delta(layer: TrainableTokensLayer, name: str = "default", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta = layer.trainable_tokens_delta[name]
        delta.copy_(torch.randn(delta.shape, generator=g))
    return delta.detach().clone()


def rows_of(indices: list[int], values: torch.Tensor) -> dict[int, torch.Tensor]:
    return dict(zip(indices, values))


# ---------------------------------------------------------------------------------------------
# the method


@pytest.mark.parametrize("tie", [True, False])
def test_standalone_math_and_structure(tie):
    model = get_peft_model(tiny(tie), TrainableTokensConfig(token_indices=IDX))
    inner = model.get_base_model()
    assert isinstance(inner.model.embed_tokens, TrainableTokensLayer)
    assert isinstance(inner.lm_head, TrainableTokensLayer) == tie
    assert torch.allclose(logits(model), logits(tiny(tie)))  # no-op start
    values = train_delta(inner.model.embed_tokens)
    out = logits(model)
    assert torch.allclose(out, reference(tie, rows_of(IDX, values)), atol=ATOL)
    assert not torch.allclose(out, logits(tiny(tie)))
    hidden = model(input_ids=X, output_hidden_states=True).hidden_states[0]
    base_hidden = tiny(tie)(input_ids=X, output_hidden_states=True).hidden_states[0]
    chosen = torch.isin(X, torch.tensor(IDX))
    assert torch.equal(hidden[~chosen], base_hidden[~chosen])
    assert not torch.allclose(hidden[chosen], base_hidden[chosen])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.model.embed_tokens.trainable_tokens_delta.default"]
    assert model.peft_config["default"].target_modules == "model.embed_tokens"


@pytest.mark.parametrize("tie", [True, False])
def test_training_moves_only_the_chosen_rows(tie):
    model = get_peft_model(tiny(tie), TrainableTokensConfig(token_indices=IDX))
    base_weight = model.get_base_model().model.embed_tokens.get_base_layer().weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    delta = model.get_base_model().model.embed_tokens.trainable_tokens_delta["default"]
    before = delta.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
    assert not torch.allclose(delta, before)
    assert torch.equal(model.get_base_model().model.embed_tokens.get_base_layer().weight, base_weight)
    if tie:  # the tied head's logits use the trained rows: token 9 never appears as input but is scored
        assert torch.allclose(logits(model), reference(tie, rows_of(IDX, delta.detach())), atol=ATOL)


@pytest.mark.parametrize("tie", [True, False])
def test_disable_merge_unmerge_unload(tie):
    model = get_peft_model(tiny(tie), TrainableTokensConfig(token_indices=IDX))
    train_delta(model.get_base_model().model.embed_tokens)
    base, adapted = logits(tiny(tie)), logits(model)
    with model.disable_adapter():
        assert torch.allclose(logits(model), base)
    assert torch.allclose(logits(model), adapted)
    model.merge_adapter()
    assert torch.allclose(logits(model), adapted, atol=ATOL)
    model.unmerge_adapter()
    assert torch.allclose(logits(model), adapted, atol=ATOL)
    with model.disable_adapter():
        assert torch.allclose(logits(model), base)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, TrainableTokensLayer) for m in merged.modules())
    assert torch.allclose(logits(merged), adapted, atol=ATOL)
    assert (merged.model.embed_tokens.weight is merged.lm_head.weight) == tie  # tied stays tied
    assert merged.config.tie_word_embeddings == tie
    plain = model.unload()
    assert torch.allclose(logits(plain), base)


def test_safe_merge_refuses_nan():
    model = get_peft_model(tiny(), TrainableTokensConfig(token_indices=IDX))
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.trainable_tokens_delta["default"][0, 0] = float("nan")
    with pytest.raises(MergeError):
        model.merge_adapter(safe_merge=True)
    assert not model.get_base_model().model.embed_tokens.merged
    assert torch.isfinite(model.get_base_model().model.embed_tokens.get_base_layer().weight).all()


def test_several_adapters_and_mixed_batch():
    model = get_peft_model(tiny(), TrainableTokensConfig(token_indices=IDX))
    model.add_adapter("other", TrainableTokensConfig(token_indices=[2, 9]))
    emb = model.get_base_model().model.embed_tokens
    a, b = train_delta(emb, "default", 0), train_delta(emb, "other", 1)
    out_a = logits(model)
    model.set_adapter("other")
    out_b = logits(model)
    assert torch.allclose(out_a, reference(True, rows_of(IDX, a)), atol=ATOL)
    assert torch.allclose(out_b, reference(True, rows_of([2, 9], b)), atol=ATOL)
    model.set_adapter(["default", "other"])  # disjoint: both apply
    both = reference(True, {**rows_of(IDX, a), **rows_of([2, 9], b)})
    assert torch.allclose(logits(model), both, atol=ATOL)
    rows = torch.cat([X, X, X])
    mixed = logits(model, rows, adapter_names=["default", "default", "other", "other", "__base__", "__base__"])
    assert torch.allclose(mixed[:2], out_a, atol=ATOL)
    assert torch.allclose(mixed[2:4], out_b, atol=ATOL)
    assert torch.allclose(mixed[4:], logits(tiny()), atol=ATOL)
    model.delete_adapter("other")
    assert "other" not in emb.trainable_tokens_delta and "other" not in emb.trainable_tokens_original
    model.delete_adapter("default")
    assert not any(isinstance(m, TrainableTokensLayer) for m in model.modules())


def test_overlapping_adapters_refused_together():
    model = get_peft_model(tiny(), TrainableTokensConfig(token_indices=IDX))
    model.add_adapter("other", TrainableTokensConfig(token_indices=[5, 9]))
    model.set_adapter(["default", "other"])
    with pytest.raises(PeftkitError, match="disjoint"):
        logits(model)
    weight = model.get_base_model().model.embed_tokens.get_base_layer().weight.detach().clone()
    with pytest.raises(MergeError, match="disjoint"):
        model.merge_adapter()
    assert torch.equal(model.get_base_model().model.embed_tokens.get_base_layer().weight, weight)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip(tie, tmp_path):
    model = get_peft_model(tiny(tie), TrainableTokensConfig(token_indices=IDX))
    train_delta(model.get_base_model().model.embed_tokens)
    model.add_adapter("second", TrainableTokensConfig(token_indices=[3]))
    train_delta(model.get_base_model().model.embed_tokens, "second", 3)
    out = logits(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {"base_model.model.model.embed_tokens.trainable_tokens_delta"}
    if tie:  # as Hugging Face PEFT: the tied head's (shared) tensor is written too
        expected.add("base_model.model.lm_head.trainable_tokens_delta")
    assert keys == expected
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "TRAINABLE_TOKENS" and data["token_indices"] == IDX
    loaded = PeftModel.from_pretrained(tiny(tie), tmp_path)
    assert torch.allclose(logits(loaded), out)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter("second")
    model.set_adapter("second")
    assert torch.allclose(logits(loaded), logits(model))


# ---------------------------------------------------------------------------------------------
# LoRA's trainable_token_indices


def _lora(tie: bool, **kw) -> torch.nn.Module:
    model = get_peft_model(tiny(tie), LoraConfig(target_modules=["q_proj", "v_proj"], **kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("indices", [IDX, {"embed_tokens": IDX}])
def test_lora_trainable_token_indices(tie, indices):
    model = _lora(tie, trainable_token_indices=indices)
    inner = model.get_base_model()
    assert isinstance(inner.model.embed_tokens, TrainableTokensWrapper)
    assert isinstance(inner.lm_head, TrainableTokensWrapper) == tie
    values = train_delta(inner.model.embed_tokens)
    out = logits(model)
    with model.disable_adapter():
        assert torch.allclose(logits(model), logits(tiny(tie)))
    sd = get_peft_model_state_dict(model)
    assert [k for k in sd if "embed_tokens" in k or "lm_head" in k] == \
        ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(sd["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"], values)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.allclose(logits(merged), out, atol=ATOL)
    assert (merged.model.embed_tokens.weight is merged.lm_head.weight) == tie
    # the token part alone is the reference: LoRA off (scale 0) leaves only the replaced rows
    for _, layer in model.base_model.model.named_modules():
        if hasattr(layer, "scaling") and isinstance(layer.scaling, dict):
            layer.scaling["default"] = 0.0
    assert torch.allclose(logits(model), reference(tie, rows_of(IDX, values)), atol=ATOL)


def test_lora_tokens_added_and_deleted_with_adapters():
    model = _lora(True, trainable_token_indices=IDX)
    model.add_adapter("b", LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 3]))
    emb = model.get_base_model().model.embed_tokens
    assert sorted(emb.adapter_names) == ["b", "default"]
    model.delete_adapter("default")
    model.delete_adapter("b")
    inner = model.get_base_model()
    assert type(inner.model.embed_tokens) is torch.nn.Embedding and type(inner.lm_head) is torch.nn.Linear
    assert inner.model.embed_tokens.weight is inner.lm_head.weight


def test_lora_tied_layers_named_separately():
    # both tied layers named with the same indices: the head follows the embedding
    model = _lora(True, trainable_token_indices={"embed_tokens": IDX, "lm_head": IDX})
    assert model.get_base_model().lm_head.tied_adapter is model.get_base_model().model.embed_tokens
    # different indices: two independent layers (merging then unties the weights), or an error with ensure_weight_tying
    model = _lora(True, trainable_token_indices={"embed_tokens": IDX, "lm_head": [2]})
    assert model.get_base_model().lm_head.tied_adapter is None
    train_delta(model.get_base_model().model.embed_tokens)
    train_delta(model.get_base_model().lm_head, seed=4)
    out = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    assert torch.allclose(logits(merged), out, atol=ATOL)
    assert merged.model.embed_tokens.weight is not merged.lm_head.weight
    with pytest.raises(ConfigError, match="different token indices"):
        get_peft_model(tiny(), LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True,
                                          trainable_token_indices={"embed_tokens": IDX, "lm_head": [2]}))


def test_ensure_weight_tying_untied_model_warns():
    with pytest.warns(peftkit.PeftkitWarning, match="does not tie"):
        get_peft_model(tiny(False), LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDX,
                                               ensure_weight_tying=True))


# ---------------------------------------------------------------------------------------------
# modules_to_save with ensure_weight_tying


@pytest.mark.parametrize("to_save", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_modules_to_save_ensure_weight_tying(to_save, tmp_path):
    model = get_peft_model(tiny(), LoraConfig(target_modules=["q_proj"], modules_to_save=list(to_save),
                                              ensure_weight_tying=True))
    inner = model.get_base_model()
    assert model.peft_config["default"].modules_to_save == ["model.embed_tokens"] or "lm_head" not in \
        model.peft_config["default"].modules_to_save
    emb_copy = inner.model.embed_tokens.modules_to_save["default"]
    head_copy = inner.lm_head.modules_to_save["default"]
    assert emb_copy.weight is head_copy.weight
    with torch.no_grad():
        emb_copy.weight[IDX] += 1.0
    out = logits(model)
    assert torch.allclose(out, reference(True, rows_of(IDX, emb_copy.weight[IDX])), atol=ATOL)
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) >= {"base_model.model.model.embed_tokens.weight",
                                                                        "base_model.model.lm_head.weight"}
    loaded = PeftModel.from_pretrained(tiny(), tmp_path)
    assert torch.allclose(logits(loaded), out)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("indices", [[64], [0, 1000], [3, 3]])
def test_bad_token_indices_standalone(indices):
    base = tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PeftkitError, match="out of range|more than once|repeated"):
        get_peft_model(base, TrainableTokensConfig(token_indices=indices))
    assert not any(isinstance(m, TrainableTokensLayer) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_bad_token_indices_lora():
    base = tiny()
    with pytest.raises(ConfigError, match="out of range"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 64]))
    assert not any(isinstance(m, peftkit.core.AdapterLayer) for m in base.modules())
    with pytest.raises(ConfigError):
        LoraConfig(trainable_token_indices=[])
    with pytest.raises(ConfigError):
        LoraConfig(trainable_token_indices={"embed_tokens": [-1]})
    with pytest.raises(ConfigError):
        LoraConfig(trainable_token_indices="embed_tokens")
    with pytest.raises(ConfigError):
        TrainableTokensConfig(token_indices=[-2])
    with pytest.raises(ConfigError, match="required|non-empty"):
        get_peft_model(tiny(), TrainableTokensConfig())


def test_bad_targets():
    with pytest.raises(TargetError):
        get_peft_model(tiny(), TrainableTokensConfig(token_indices=IDX, target_modules=["nope"]))
    base = tiny()
    with pytest.raises(TargetError, match="matches no module"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], trainable_token_indices={"nope": IDX}))
    assert not any(isinstance(m, peftkit.core.AdapterLayer) for m in base.modules())
    with pytest.raises(ConfigError, match="modules_to_save"):
        get_peft_model(tiny(), LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                          trainable_token_indices={"embed_tokens": IDX}))
    with pytest.raises(TargetError, match="nn.Embedding"):
        get_peft_model(tiny(), TrainableTokensConfig(token_indices=IDX, target_modules=["norm"]))


# ---------------------------------------------------------------------------------------------
# interop with Hugging Face PEFT


def _hf():
    return pytest.importorskip("peft", minversion="0.21")


def _config(lib, kind: str):
    """The same config in either library: the method, LoRA with tokens, LoRA with a tied modules_to_save."""
    if kind == "standalone":
        return lib.TrainableTokensConfig(token_indices=IDX)
    if kind == "lora":
        return lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=IDX, init_lora_weights=False)
    return lib.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True,
                          init_lora_weights=False)


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


KINDS = ["standalone", "lora", "mts"]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_interop_peftkit_to_hf(tie, kind, tmp_path):
    peft = _hf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(tiny(tie), _config(peftkit, kind))
        _perturb(ours)
        out = logits(ours)
        ours.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny(tie), tmp_path)
    assert torch.allclose(logits(theirs), out, atol=ATOL)
    hf_file = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(hf_file)
    assert set(load_file(hf_file / "adapter_model.safetensors")) == set(load_file(tmp_path / "adapter_model.safetensors"))
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    hf_cfg = json.loads((hf_file / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(hf_cfg)
    for key in ("token_indices", "target_modules", "trainable_token_indices", "modules_to_save", "ensure_weight_tying"):
        assert _norm(ours_cfg.get(key)) == _norm(hf_cfg.get(key)), key


def _norm(value):
    return sorted(value) if isinstance(value, list) else value


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_interop_hf_to_peftkit(tie, kind, tmp_path):
    peft = _hf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny(tie), _config(peft, kind))
        _perturb(theirs)
        out = logits(theirs)
        theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ignoring.*")  # no tensor of the file left out
        ours = PeftModel.from_pretrained(tiny(tie), tmp_path)
    assert torch.allclose(logits(ours), out, atol=ATOL)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
