"""Structured pruning (peftkit.prune.structured): whole heads and MLP channels removed physically.

The reference of every check is the dense model with the same heads and channels masked: their input
columns of the attention output projection and of the MLP down projection zeroed, written here
directly on the transformers modules. Importance scores are recomputed here from the weights (and,
for Wanda, from inputs captured by the test's own hooks)."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch import nn

from peftkit.errors import CheckpointError, ConfigError
from peftkit.prune.structured import load_structured, save_structured, structured_prune

from .models import bundled, tiny_bert_cls, tiny_gpt2, tiny_llama


def llama_gqa():
    """8 query heads over 4 KV heads (groups of 2), head_dim 4, 3 layers, attention and MLP biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=4, vocab_size=64, max_position_embeddings=64,
                      attention_bias=True, mlp_bias=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def spread(model: nn.Module, std: float = 0.3) -> nn.Module:
    """GPT-2 and BERT initialize with std 0.02, which leaves tiny models' outputs near zero; wider weights (and
    non-zero biases) make every head and channel matter."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "ln_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def gpt2() -> nn.Module:
    return spread(tiny_gpt2())


def bert() -> nn.Module:
    return spread(tiny_bert_cls())


# name: (build, heads fraction, channels fraction, vocab)
MODELS = {
    "llama": (tiny_llama, 0.5, 0.3, 64),
    "llama_gqa": (llama_gqa, 0.25, 0.4, 64),
    "gpt2": (gpt2, 0.5, 0.3, 64),
    "bert": (bert, 0.25, 0.3, 64),
    "stories260k": (bundled, 0.5, 0.3, 512),
}


def ids(vocab: int, batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def layers_of(model: nn.Module) -> list:
    base = model.base_model
    return list(base.layers if hasattr(base, "layers") else base.h if hasattr(base, "h") else base.encoder.layer)


def kind(model: nn.Module) -> str:
    return model.config.model_type


def head_dim(model: nn.Module) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def mask(model: nn.Module, result) -> nn.Module:
    """A copy of the dense ``model`` with the removed heads' and channels' output-projection inputs zeroed."""
    model = copy.deepcopy(model)
    d = head_dim(model)
    with torch.no_grad():
        for layer, heads, chans in zip(layers_of(model), result.heads_removed, result.channels_removed):
            cols = [h * d + k for h in heads for k in range(d)]
            if kind(model) == "llama":
                layer.self_attn.o_proj.weight[:, cols] = 0
                layer.mlp.down_proj.weight[:, chans] = 0
            elif kind(model) == "gpt2":  # Conv1D weights are [in, out]
                layer.attn.c_proj.weight[cols, :] = 0
                layer.mlp.c_proj.weight[chans, :] = 0
            else:
                layer.attention.output.dense.weight[:, cols] = 0
                layer.output.dense.weight[:, chans] = 0
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            {n: (type(m).__name__, dict(m.__dict__.get("_forward_pre_hooks", {}))) for n, m in model.named_modules()},
            {n: getattr(m, a) for n, m in model.named_modules()
             for a in ("num_heads", "split_size", "num_attention_heads", "all_head_size", "intermediate_size")
             if hasattr(m, a)})


def assert_same(model: nn.Module, snap: tuple) -> None:
    state, config, modules, attrs = snapshot(model)
    assert state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)
    assert config == snap[1] and modules == snap[2] and attrs == snap[3]
    assert not hasattr(model, "peftkit_structure")


# ---------------------------------------------------------------------------------------------
# equality with the masked dense model


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_masked_dense(name):
    build, heads, channels, vocab = MODELS[name]
    model = build()
    dense = copy.deepcopy(model)
    x = ids(vocab)
    result = structured_prune(model, heads, channels)
    n_layers = len(layers_of(model))
    assert all(len(h) == result.heads[0] - result.heads[1] > 0 for h in result.heads_removed)
    assert all(len(c) == round(channels * result.channels[0]) > 0 for c in result.channels_removed)
    assert len(result.heads_removed) == len(result.channels_removed) == n_layers
    masked = mask(dense, result)
    out = logits(model, x)
    torch.testing.assert_close(out, logits(masked, x), atol=1e-5, rtol=1e-5)
    assert (out - logits(dense, x)).abs().max() > 1e-2 * out.abs().max()  # the removed units mattered


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "stories260k"])
def test_generation_with_kv_cache_equals_masked(name):
    build, heads, channels, vocab = MODELS[name]
    model = build()
    dense = copy.deepcopy(model)
    result = structured_prune(model, heads, channels)
    masked = mask(dense, result)
    prompt = ids(vocab, batch=2, length=5, seed=4)
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=True, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    got, want = model.generate(prompt, **kwargs), masked.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
    # the cached decode equals a full forward of the generated sequence
    full = logits(model, got.sequences)[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(got.scores, 1), full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# sizes: tensors, parameter counts, config and module attributes


def expected_removed_params(model: nn.Module, heads: int, channels: int) -> int:
    """Parameters one layer loses when ``heads`` query heads and ``channels`` channels go (per the module shapes)."""
    c, d = model.config, head_dim(model)
    if kind(model) == "llama":
        r = c.num_attention_heads // c.num_key_value_heads
        hidden, kv = c.hidden_size, heads // r
        b_attn, b_mlp = int(c.attention_bias), int(c.mlp_bias)
        attn = heads * d * (hidden + b_attn) + 2 * kv * d * (hidden + b_attn) + heads * d * hidden
        return attn + channels * (2 * (hidden + b_mlp) + hidden)
    hidden = c.hidden_size
    attn = 3 * heads * d * (hidden + 1) + heads * d * hidden  # q, k, v rows with biases; output columns
    return attn + channels * (hidden + 1) + channels * hidden


@pytest.mark.parametrize("name", ["llama", "llama_gqa", "gpt2", "bert"])
def test_parameter_counts_and_config(name):
    build, heads, channels, vocab = MODELS[name]
    model = build()
    dense = copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    result = structured_prune(model, heads, channels)
    n_heads, n_ch = result.heads[0] - result.heads[1], result.channels[0] - result.channels[1]
    after = before - len(layers_of(model)) * expected_removed_params(dense, n_heads, n_ch)
    assert result.params == (before, after) == (before, sum(p.numel() for p in model.parameters()))
    assert math.isclose(result.param_reduction, 1 - after / before)
    c, d = model.config, head_dim(dense)
    kept_h, kept_c = result.heads[1], result.channels[1]
    for layer in layers_of(model):
        if kind(model) == "llama":
            says = c.hidden_size % kept_h == 0  # LlamaConfig's own rule
            heads_in_config = (kept_h, result.kv_heads[1]) if says else (result.heads[0], result.kv_heads[0])
            assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == \
                (*heads_in_config, d, kept_c)
            assert result.config_describes_model == says
            assert layer.self_attn.head_dim == d
            assert layer.self_attn.num_key_value_groups == kept_h // result.kv_heads[1]
            assert layer.self_attn.q_proj.weight.shape == (kept_h * d, c.hidden_size)
            assert layer.self_attn.k_proj.out_features == result.kv_heads[1] * d
            assert layer.self_attn.o_proj.in_features == kept_h * d
            assert layer.mlp.intermediate_size == kept_c and layer.mlp.down_proj.weight.shape[1] == kept_c
        elif kind(model) == "gpt2":
            assert (layer.attn.num_heads, layer.attn.split_size, layer.attn.head_dim) == (kept_h, kept_h * d, d)
            assert layer.attn.c_attn.weight.shape == (c.n_embd, 3 * kept_h * d)
            assert layer.attn.c_attn.nf == 3 * kept_h * d
            assert c.n_inner == kept_c and layer.mlp.c_proj.nx == kept_c and c.n_head == dense.config.n_head
        else:
            att = layer.attention.self
            assert (att.num_attention_heads, att.all_head_size, att.attention_head_size) == (kept_h, kept_h * d, d)
            assert c.intermediate_size == kept_c and layer.output.dense.in_features == kept_c
    assert "peftkit_structure" not in dense.__dict__


# ---------------------------------------------------------------------------------------------
# importance


def reference_scores(model: nn.Module, layer: nn.Module, what: str, norms=None) -> torch.Tensor:
    """Unit scores from the weights, written per architecture: Σ |W| (times the input norm ‖X_j‖ with Wanda)."""
    c, d = model.config, head_dim(model)

    def blocks(mod, axis, size, offset=0, n=None):  # per-unit sums of |W|(·‖X‖) along axis of a [out, in] weight
        w = mod.weight.detach().double().abs()
        w = w.T if kind(model) == "gpt2" else w  # Conv1D -> [out, in]
        if norms is not None:
            w = w * norms[mod].double()[None, :]
        v = w.sum(1) if axis == "out" else w.sum(0)
        n = n or (v.numel() - offset) // size
        return v[offset:offset + n * size].reshape(n, size).sum(1)

    if what == "channels":
        if kind(model) == "llama":
            m = layer.mlp
            return blocks(m.gate_proj, "out", 1) + blocks(m.up_proj, "out", 1) + blocks(m.down_proj, "in", 1)
        if kind(model) == "gpt2":
            return blocks(layer.mlp.c_fc, "out", 1) + blocks(layer.mlp.c_proj, "in", 1)
        return blocks(layer.intermediate.dense, "out", 1) + blocks(layer.output.dense, "in", 1)
    if kind(model) == "llama":
        a, r = layer.self_attn, c.num_attention_heads // c.num_key_value_heads
        return (blocks(a.q_proj, "out", r * d) + blocks(a.k_proj, "out", d) + blocks(a.v_proj, "out", d)
                + blocks(a.o_proj, "in", r * d))
    if kind(model) == "gpt2":
        a, h = layer.attn, c.n_head
        return sum(blocks(a.c_attn, "out", d, k * h * d, h) for k in range(3)) + blocks(a.c_proj, "in", d)
    a = layer.attention
    return (blocks(a.self.query, "out", d) + blocks(a.self.key, "out", d) + blocks(a.self.value, "out", d)
            + blocks(a.output.dense, "in", d))


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (scores[i].item(), i))
    return sorted(order[:n])


def captured_norms(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """‖X_j‖₂ of every linear's inputs over all calibration tokens, captured with the test's own hooks."""
    acc: dict = {}
    lin = [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    hooks = [m.register_forward_hook(lambda m, a, o: acc.setdefault(m, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for m in lin]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {m: torch.cat(v).double().norm(dim=0) for m, v in acc.items()}


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "bert"])
@pytest.mark.parametrize("importance", ["l1", "wanda"])
def test_importance_picks_the_lowest_scores(name, importance):
    build, heads, channels, vocab = MODELS[name]
    model = build()
    dense = copy.deepcopy(model)
    batches = [ids(vocab, seed=7), ids(vocab, batch=2, length=5, seed=8)]
    norms = captured_norms(dense, batches) if importance == "wanda" else None
    if importance == "wanda":
        model.train()  # calibration runs in eval mode and gives the modes back
    result = structured_prune(model, heads, channels, importance=importance,
                              calibration=batches if importance == "wanda" else None)
    assert model.training == (importance == "wanda")
    r = result.heads[0] // result.kv_heads[0]
    for layer, kv_gone, gone, ch_gone in zip(layers_of(dense), result.kv_heads_removed, result.heads_removed,
                                             result.channels_removed):
        h_scores = reference_scores(dense, layer, "heads", norms)
        assert kv_gone == lowest(h_scores, result.kv_heads[0] - result.kv_heads[1])
        assert gone == [u * r + k for u in kv_gone for k in range(r)]
        assert ch_gone == lowest(reference_scores(dense, layer, "channels", norms),
                                 result.channels[0] - result.channels[1])


def test_wanda_uses_the_activations():
    """Wanda weighs the weights by the calibration inputs: on the same model it removes other channels than l1."""
    build, _, _, vocab = MODELS["llama_gqa"]
    batches = [ids(vocab, seed=7)]
    l1, wanda = build(), build()
    r_l1 = structured_prune(l1, 0, 0.4)
    r_wanda = structured_prune(wanda, 0, 0.4, importance="wanda", calibration=batches)
    assert r_l1.channels_removed != r_wanda.channels_removed
    assert r_l1.heads_removed == r_wanda.heads_removed == [[], [], []]


# ---------------------------------------------------------------------------------------------
# saving and loading


@pytest.mark.parametrize("name,heads,channels", [("llama", 0.5, 0.3), ("stories260k", 0.5, 0.3), ("gpt2", 0, 0.3),
                                                  ("bert", 0, 0.3)])
def test_folder_loads_with_plain_from_pretrained_when_the_config_says_it(tmp_path, name, heads, channels):
    """Llama with 2 of 4 (4 of 8) heads left: hidden_size is a multiple of them; GPT-2/BERT: channels only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    build, _, _, vocab = MODELS[name]
    model = build()
    result = structured_prune(model, heads, channels)
    assert result.config_describes_model
    save_structured(model, tmp_path)
    x = ids(vocab)
    want = logits(model, x)
    auto = AutoModelForSequenceClassification if name == "bert" else AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(plain, x), want)
    ours = load_structured(tmp_path)
    assert torch.equal(logits(ours, x), want)
    assert ours.peftkit_structure == model.peftkit_structure
    saved = json.loads((tmp_path / "structure.json").read_text())
    assert saved == dict(model.peftkit_structure, config_describes_model=True)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "bert"])
def test_round_trip_when_the_config_cannot_say_it(tmp_path, name):
    """Llama with 6 of 8 heads (hidden 32), GPT-2 and BERT with heads removed: only load_structured loads it."""
    from transformers import AutoModel

    build, heads, channels, vocab = MODELS[name]
    model = build()
    original = model.config.to_dict()
    result = structured_prune(model, heads, channels)
    assert not result.config_describes_model
    key = {"llama": "num_attention_heads", "gpt2": "n_head", "bert": "num_attention_heads"}[kind(model)]
    assert model.config.to_dict()[key] == original[key]  # the attention modules carry the new count
    save_structured(model, tmp_path)
    loaded = load_structured(tmp_path)
    x = ids(vocab)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="size"):  # transformers refuses the shapes: nothing loads silently
        AutoModel.from_pretrained(tmp_path)


def test_repeated_pruning_composes_the_record(tmp_path):
    model = gpt2()
    dense = copy.deepcopy(model)
    first = structured_prune(model, 0.25, 0.25)
    second = structured_prune(model, 0.34, 0.25)
    assert second.heads == (3, 2) and second.channels == (48, 36)
    for entry, h1, h2, c1, c2 in zip(model.peftkit_structure["layers"], first.heads_removed, second.heads_removed,
                                     first.channels_removed, second.channels_removed):
        kept1 = [h for h in range(4) if h not in h1]
        assert entry["heads_kept"] == [h for i, h in enumerate(kept1) if i not in h2]
        kept1 = [c for c in range(64) if c not in c1]
        assert entry["channels_kept"] == [c for i, c in enumerate(kept1) if i not in c2]
    # the dense model with every removed unit (original indices) masked gives the same logits
    gone = [[h for h in range(4) if h not in e["heads_kept"]] for e in model.peftkit_structure["layers"]]
    gone_c = [[c for c in range(64) if c not in e["channels_kept"]] for e in model.peftkit_structure["layers"]]
    fake = type("R", (), {"heads_removed": gone, "channels_removed": gone_c})
    x = ids(64)
    torch.testing.assert_close(logits(model, x), logits(mask(dense, fake), x), atol=1e-5, rtol=1e-5)
    save_structured(model, tmp_path)
    assert torch.equal(logits(load_structured(tmp_path), x), logits(model, x))


def test_bad_folders(tmp_path):
    model = bert()
    structured_prune(model, 0.25, 0.3)
    with pytest.raises(CheckpointError, match="structure.json"):
        load_structured(tmp_path)
    save_structured(model, tmp_path)
    path = tmp_path / "structure.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_structured(tmp_path)
    bad = copy.deepcopy(good)
    bad["layers"][0]["heads_kept"] = [0, 0, 1]
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_structured(tmp_path)
    bad = copy.deepcopy(good)
    bad["layers"][0]["heads_kept"] = [0, 1]  # two heads: the weights hold three
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="shape"):
        load_structured(tmp_path)
    bad = copy.deepcopy(good)
    bad["layers"] = bad["layers"][:1]
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="layers"):
        load_structured(tmp_path)
    path.write_text(json.dumps(good))
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "classifier.weight"}, weights)
    with pytest.raises(CheckpointError, match="no tensor for 1 parameters.*classifier.weight"):
        load_structured(tmp_path)
    save_file(dict(tensors, **{"extra.weight": torch.ones(2)}), weights)
    with pytest.raises(CheckpointError, match="extra.weight is not a tensor"):
        load_structured(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_structured(tmp_path)


# ---------------------------------------------------------------------------------------------
# bad input: a clear ConfigError and the model bit-identical


BAD = [
    ("llama", dict(heads=1.0), "fraction in \\[0, 1\\)"),
    ("llama", dict(heads=-0.1), "fraction"),
    ("llama", dict(channels=float("nan")), "fraction"),
    ("llama", dict(heads=True), "fraction"),
    ("llama", dict(channels="0.3"), "fraction"),
    ("llama", dict(heads=0.3), "whole KV groups of 2 query heads; use a multiple of 0.5"),
    ("llama_gqa", dict(heads=0.1), "multiple of 0.25"),
    ("llama", dict(heads=0, channels=0.99), "removes all 32 channels"),
    ("gpt2", dict(heads=0.9), "removes all 4 heads"),
    ("bert", dict(importance="magnitude"), "importance must be one of"),
    ("bert", dict(importance="wanda"), "needs calibration data"),
    ("gpt2", dict(calibration=torch.ones(2, 3, dtype=torch.long)), "importance='wanda' only"),
    ("gpt2", dict(importance="wanda", calibration=torch.randn(2, 3)), "integer tensor"),
    ("gpt2", dict(importance="wanda", calibration="hello"), "token ids"),
    ("gpt2", dict(importance="wanda", calibration=[]), "empty"),
    ("gpt2", dict(importance="wanda", calibration=[{"labels": torch.ones(1, 2)}]), "input_ids"),
    ("llama", dict(heads=0.5, importance="wanda", calibration=torch.full((1, 4), 10_000)), "calibration batch 0"),
]


@pytest.mark.parametrize("name,kwargs,match", BAD)
def test_bad_input_leaves_the_model_unchanged(name, kwargs, match):
    model = MODELS[name][0]()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        structured_prune(model, **kwargs)
    assert_same(model, snap)


def test_unsupported_models_and_wrapped_layers():
    from peftkit import LoraConfig, get_peft_model

    from .models import MLP, tiny_t5

    for model in (MLP(), tiny_t5()):
        snap = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConfigError, match="supports|transformers model"):
            structured_prune(model, 0.25, 0.25)
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    peft = get_peft_model(tiny_llama(), LoraConfig(target_modules=["o_proj", "down_proj"]))
    with pytest.raises(ConfigError, match="merge_and_unload"):
        structured_prune(peft, 0.5, 0.25)
    inner = peft.base_model.model
    snap = snapshot(inner)
    with pytest.raises(ConfigError, match="not a plain linear layer.*merge_and_unload"):
        structured_prune(inner, 0.5, 0.25)
    assert_same(inner, snap)


def test_nothing_removed_is_a_no_op(tmp_path):
    model = bert()
    snap = snapshot(model)
    result = structured_prune(model, 0, 0)
    assert result.heads == (4, 4) and result.channels == (32, 32) and result.params[0] == result.params[1]
    del model.peftkit_structure
    assert_same(model, snap)
    save_structured(model, tmp_path)
    assert os.path.isfile(tmp_path / "structure.json")
    x = ids(64)
    assert torch.equal(logits(load_structured(tmp_path), x), logits(model, x))


def test_bert_model_without_a_head(tmp_path):
    """BertModel itself (no task head): hidden states equal the masked dense model's; the folder reloads."""
    from transformers import BertModel

    model = spread(BertModel(tiny_bert_cls().config).eval())
    dense = copy.deepcopy(model)
    result = structured_prune(model, 0.5, 0.25)
    x = ids(64)
    with torch.no_grad():
        out = model(input_ids=x).last_hidden_state
        want = mask(dense, result)(input_ids=x).last_hidden_state
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    save_structured(model, tmp_path)
    loaded = load_structured(tmp_path)
    assert type(loaded) is BertModel
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).last_hidden_state, out)
