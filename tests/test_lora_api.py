"""LoRA API details: targeting, patterns, init options, dtypes, combining, folders and the Hub."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from peftkit import (
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_model,
    set_peft_model_state_dict,
)
from peftkit.inject import AdapterLayer, mixed_batch
from peftkit.methods.lora import Linear as LoraLinear
from peftkit.methods.lora import LoraLayer

from .models import MLP, randomize_adapters, tiny_llama


def llama_ids(batch=2, length=6):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(0))


def lora_modules(model):
    return {k.replace("base_model.model.", ""): m for k, m in model.named_modules() if isinstance(m, LoraLinear)}


# -- targeting ----------------------------------------------------------------------------------


def test_target_forms():
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "mlp.down_proj"]))
    assert sorted(lora_modules(m)) == [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("mlp.down_proj", "self_attn.q_proj")]
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.1\.self_attn\.(k|v)_proj"))
    assert sorted(lora_modules(m)) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    keys = lora_modules(m)
    assert len(keys) == 14 and "lm_head" not in keys
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "mlp.up_proj"]))
    assert len(lora_modules(m)) == 10
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"))
    assert list(lora_modules(m)) == ["model.layers.1.self_attn.q_proj"]
    m = get_peft_model(tiny_llama(), LoraConfig())  # default targets for llama: q_proj, v_proj
    assert {k.rsplit(".", 1)[1] for k in lora_modules(m)} == {"q_proj", "v_proj"}


def test_rank_and_alpha_patterns_give_hf_scalings():
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4, "v_proj": 2},
                     alpha_pattern={"q_proj": 16})
    layers = lora_modules(get_peft_model(tiny_llama(), cfg))
    q, v = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.v_proj"]
    assert q.r["default"] == 4 and q.scaling["default"] == 4.0 and q.lora_A["default"].weight.shape == (4, 16)
    assert v.r["default"] == 2 and v.scaling["default"] == 4.0
    layers = lora_modules(get_peft_model(tiny_llama(), cfg.replace(use_rslora=True)))
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 8.0
    assert math.isclose(layers["model.layers.0.self_attn.v_proj"].scaling["default"], 8 / math.sqrt(2))
    # a pattern for one layer only
    cfg = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2})
    layers = lora_modules(get_peft_model(tiny_llama(), cfg))
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 4
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 2


def test_bias_modes_and_modules_to_save():
    torch.manual_seed(0)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], bias="all"))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert {"base_model.model.lin1.bias", "base_model.model.lin2.bias", "base_model.model.lin0.base_layer.bias"} <= trainable
    assert "base_model.model.lin1.bias" in get_peft_model_state_dict(pm)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], bias="lora_only"))
    sd = get_peft_model_state_dict(pm)
    assert "base_model.model.lin0.base_layer.bias" in sd and "base_model.model.lin1.bias" not in sd
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    sd = get_peft_model_state_dict(pm)
    assert {"base_model.model.lin2.weight", "base_model.model.lin2.bias"} <= set(sd)
    assert pm.base_model.model.lin2.modules_to_save["default"].weight.requires_grad
    assert not pm.base_model.model.lin2.original_module.weight.requires_grad


def test_task_heads_join_modules_to_save():
    from .models import tiny_bert_cls

    pm = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert pm.peft_config["default"].modules_to_save == ["classifier"]
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    sd = get_peft_model_state_dict(pm)
    assert "base_model.model.classifier.weight" in sd


# -- init options -------------------------------------------------------------------------------


def test_init_options():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    q = lora_modules(pm)["model.layers.0.self_attn.q_proj"]
    assert torch.all(q.lora_B["default"].weight == 0) and q.lora_A["default"].weight.std() > 0
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    q = lora_modules(pm)["model.layers.0.self_attn.q_proj"]
    assert q.lora_B["default"].weight.abs().sum() > 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_keeps_output_and_takes_principal_components(init):
    base = tiny_llama()
    ids = llama_ids()
    with torch.no_grad():
        ref = base(ids).logits
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, ref, atol=1e-5)
    q = lora_modules(pm)["model.layers.0.self_attn.q_proj"]
    delta = q.delta_weight("default")
    U, S, Vh = torch.linalg.svd(w)
    best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    tol = 1e-4 if init == "pissa" else 5e-2
    assert torch.allclose(delta, best, atol=tol)
    assert torch.allclose(q.base_layer.weight + delta, w, atol=1e-5)


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_adapters(dtype):
    base = tiny_llama().to(dtype)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(pm)
    q = lora_modules(pm)["model.layers.0.self_attn.q_proj"]
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.base_layer.weight.dtype == dtype
    ids = llama_ids()
    with torch.no_grad():
        out = pm(ids).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        pm.merge_adapter()
        merged = pm(ids).logits
    assert torch.allclose(merged.float(), out.float(), atol=5e-2, rtol=5e-2)
    pm.unmerge_adapter()
    pm.train()
    loss = pm(ids).logits.float().pow(2).mean()
    loss.backward()
    assert q.lora_B["default"].weight.grad is not None


# -- combining ----------------------------------------------------------------------------------


def _two_adapters():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    randomize_adapters(pm, seed=5)
    return pm


def test_add_weighted_adapter_cat_is_exact_and_svd_approximates():
    pm = _two_adapters()
    pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "cat", combination_type="cat")
    for key, layer in lora_modules(pm).items():
        want = sum(w * layer.delta_weight(a) for a, w in (("default", 0.7), ("b", -1.3)) if a in layer.r)
        assert torch.allclose(layer.delta_weight("cat"), want, atol=1e-5), key
    assert lora_modules(pm)["model.layers.0.self_attn.q_proj"].r["cat"] == 6
    pm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "svd", combination_type="svd", svd_rank=6)
    q = lora_modules(pm)["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(q.delta_weight("svd"), q.delta_weight("cat"), atol=1e-4)  # rank 6 holds it exactly
    pm.set_adapter("cat")
    ids = llama_ids()
    with torch.no_grad():
        cat_out = pm(ids).logits
        pm.set_adapter("svd")
        assert torch.allclose(pm(ids).logits, cat_out, atol=1e-4)


def test_add_weighted_adapter_linear_and_errors():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(pm, seed=6)
    pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "lin", combination_type="linear")
    q = lora_modules(pm)["model.layers.0.self_attn.q_proj"]
    c = math.sqrt(0.5 * q.scaling["default"])
    A = c * (q.lora_A["default"].weight + q.lora_A["b"].weight)
    B = c * (q.lora_B["default"].weight + q.lora_B["b"].weight)
    assert torch.allclose(q.delta_weight("lin"), B @ A, atol=1e-6)
    pm.add_adapter("r2", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="equal rank"):
        pm.add_weighted_adapter(["default", "r2"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="Unknown adapter"):
        pm.add_weighted_adapter(["default", "nope"], [1, 1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type"):
        pm.add_weighted_adapter(["default"], [1], "x", combination_type="ties")
    assert "x" not in pm.peft_config


# -- bare modules -------------------------------------------------------------------------------


def test_inject_adapter_in_model_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin0", "lin1"]), MLP())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "lin0.lora_A.default.weight", "lin0.lora_B.default.weight", "lin1.lora_A.default.weight", "lin1.lora_B.default.weight"}
    randomize_adapters(model)
    sd = get_peft_model_state_dict(model)
    assert set(sd) == {"lin0.lora_A.weight", "lin0.lora_B.weight", "lin1.lora_A.weight", "lin1.lora_B.weight"}
    torch.manual_seed(0)
    other = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin0", "lin1"]), MLP())
    set_peft_model_state_dict(other, sd)
    x = torch.randn(3, 10)
    assert torch.equal(model(x), other(x))


# -- folders ------------------------------------------------------------------------------------


def test_selected_adapters_subfolders_and_load_adapter(tmp_path):
    pm = _two_adapters()
    ids = llama_ids()
    with torch.no_grad():
        out_default = pm(ids).logits
        pm.set_adapter("b")
        out_b = pm(ids).logits
    pm.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_config.json") and os.path.isfile(tmp_path / "b" / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    assert loaded.active_adapter == "default"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out_default)
        loaded.set_adapter("b")
        assert torch.equal(loaded(ids).logits, out_b)
    only_b = tmp_path / "only_b"
    pm.save_pretrained(only_b, selected_adapters=["b"])
    assert sorted(os.listdir(only_b)) == ["README.md", "b"]  # one model card at the top, as HF PEFT


def test_config_file_format(tmp_path):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True and data["task_type"] == "CAUSAL_LM"
    assert len(data) == 41
    readme = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in readme
    # a newer file with unknown fields loads with a warning
    data["from_the_future"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="from_the_future"):
        cfg = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, LoraConfig) and cfg.r == 4


def test_legacy_bin_loads_with_weights_only(tmp_path, monkeypatch):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(pm)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert calls == [True]
    ids = llama_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pm(ids).logits)


def test_auto_peft_model_loads_base_from_local_folder(tmp_path):
    model, tok = load_model()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    randomize_adapters(pm)
    pm.save_pretrained(tmp_path)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pm(ids).logits)


def test_hub_id_resolves_from_offline_cache(tmp_path, monkeypatch):
    """A pre-filled Hugging Face cache folder serves a Hub id with no network."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(pm)
    src = tmp_path / "src"
    pm.save_pretrained(src)
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-lora"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snap / name).write_bytes((src / name).read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = PeftConfig.from_pretrained("someone/tiny-lora", cache_dir=str(cache))
    assert cfg.r == 4
    loaded = PeftModel.from_pretrained(tiny_llama(), "someone/tiny-lora", cache_dir=str(cache))
    ids = llama_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pm(ids).logits)


def test_push_to_hub_uploads_the_adapter_folder(monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            seen["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            seen["files"] = sorted(os.listdir(folder_path))
            return "done"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert pm.push_to_hub("me/adapter", token="t") == "done"
    assert seen == {"token": "t", "repo": "me/adapter",
                    "files": ["README.md", "adapter_config.json", "adapter_model.safetensors"]}


# -- training -----------------------------------------------------------------------------------


def test_training_reduces_loss_on_bundled_model():
    from peftkit.assets import ASSETS_DIR

    torch.manual_seed(0)
    model, tok = load_model()
    text = (ASSETS_DIR / "data" / "tinystories_sample.txt").read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    blocks = ids[: len(ids) // 64 * 64].view(-1, 64)[:32]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)

    def loss_on_all():
        with torch.no_grad():
            return pm(input_ids=blocks, labels=blocks).loss.item()

    before = loss_on_all()
    pm.train()
    for step in range(25):
        batch = blocks[(torch.arange(8) + 8 * step) % len(blocks)]
        loss = pm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    after = loss_on_all()
    assert after < before - 0.05, (before, after)


def test_adapter_layers_are_few_and_typed():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 14 and all(isinstance(m, LoraLinear) for m in layers)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, nn.Linear)


@pytest.mark.parametrize("tokens", [1, 3, 9])
@pytest.mark.parametrize("assign", ["in_order", "shuffled", "repeated_with_base", "few_adapters_many_rows"])
def test_batched_lora_paths_agree_with_per_row_reference(tokens, assign):
    """Sliced stacks (rows in slot order), grouped matmul (few adapters shared by many rows) and
    gathered stacks (anything else) all equal the per-row math, with and without ``add_to``."""
    from peftkit.core.kernels import batched_lora
    from peftkit.core.mixed import RowPlan

    g = torch.Generator().manual_seed(0)
    n, d_in, r, d_out = 5, 16, 8, 24
    A = torch.randn(n + 1, d_in, r, generator=g)
    B = torch.randn(n + 1, r, d_out, generator=g)
    A[0], B[0] = 0, 0
    idx = {"in_order": [1, 2, 3, 4, 5], "shuffled": [3, 1, 5, 2, 4], "repeated_with_base": [2, 0, 2, 5, 0, 1],
           "few_adapters_many_rows": [2, 4, 2, 2, 0, 4, 4, 2, 0, 2, 4, 4]}[assign]
    plan = RowPlan(torch.tensor(idx))
    assert (plan.start is not None) == (assign == "in_order")
    x = torch.randn(len(idx), tokens, d_in, generator=g)
    want = torch.stack([x[i] @ A[j] @ B[j] for i, j in enumerate(idx)])
    with torch.no_grad():
        got = batched_lora(x, A, B, plan)
        assert torch.allclose(got, want, atol=1e-4)
        base = torch.randn(len(idx), tokens, d_out, generator=g)
        expected = base + want
        kept = base.clone()
        out = batched_lora(x, A, B, plan, add_to=base)  # not in place unless asked
        assert out.data_ptr() != base.data_ptr() and torch.equal(base, kept) and torch.allclose(out, expected, atol=1e-4)
        out = batched_lora(x, A, B, plan, add_to=base, in_place=True)  # added in place without autograd
        assert out.data_ptr() == base.data_ptr() and torch.allclose(out, expected, atol=1e-4)
    A.requires_grad_(True)
    got = batched_lora(x, A, B, RowPlan(torch.tensor(idx)))  # training path (gathered or sliced)
    assert torch.allclose(got, want, atol=1e-4)
    got.sum().backward()
    assert A.grad is not None
    base = torch.randn(len(idx), tokens, d_out, generator=g, requires_grad=True)
    out = batched_lora(x, A, B, RowPlan(torch.tensor(idx)), add_to=base, in_place=True)  # out of place under autograd
    assert torch.allclose(out, base.detach() + want, atol=1e-4)
    out.sum().backward()
    assert torch.equal(base.grad, torch.ones_like(base))


def test_decode_steps_on_cpu_take_padded_groups_and_lopsided_batches_do_not(monkeypatch):
    """One token a row, many rows over few adapters, on a CPU: two batched matmuls over one padded group
    per adapter (no grouped_mm); a batch where one adapter holds most rows keeps the grouped matmul."""
    import torch.nn.functional as F

    from peftkit.core.kernels import batched_lora
    from peftkit.core.mixed import RowPlan

    calls = []
    if hasattr(F, "grouped_mm"):
        real = F.grouped_mm
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 16, 8, generator=g), torch.randn(6, 8, 24, generator=g)
    for idx, padded in (([3, 1, 3, 5, 1, 5, 3, 1, 5, 5, 1, 3], True),  # 3 adapters, 4 rows each
                        ([2, 4, 2, 2, 0, 4, 4, 2, 0, 2, 4, 4], True),  # slots 0, 2, 4: not consecutive
                        ([2] * 30 + [1, 3, 4, 5], False)):  # 5 groups of up to 30 places for 34 rows
        plan = RowPlan(torch.tensor(idx))
        x = torch.randn(len(idx), 1, 16, generator=g)
        want = torch.stack([x[i] @ A[j] @ B[j] for i, j in enumerate(idx)])
        calls.clear()
        with torch.no_grad():
            assert torch.allclose(batched_lora(x, A, B, plan), want, atol=1e-4)
        assert (not calls) == padded or not hasattr(F, "grouped_mm"), idx
    slots, first, m, gather, place = RowPlan(torch.tensor([3, 1, 3])).padded_groups()
    assert slots.tolist() == [1, 3] and first is None and m == 2
    assert gather.tolist() == [1, 3, 0, 2] and place.tolist() == [2, 0, 3]  # 3: the zero row


def test_base_linear_hooks_and_patched_forwards_still_run():
    """LoRA computes a plain hook-free nn.Linear base with F.linear directly; hooks on the base
    (forward pre/post, global) and an instance-level forward (as accelerate installs) are honoured."""
    torch.manual_seed(0)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin1"]))
    randomize_adapters(pm)
    layer = pm.base_model.model.lin1
    base = layer.base_layer
    x = torch.randn(3, 20)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, base.weight, base.bias)
        want = layer(x)
        assert not torch.allclose(want, plain)
        seen = []
        pre = base.register_forward_pre_hook(lambda m, args: seen.append("pre"))
        post = base.register_forward_hook(lambda m, args, out: out * 2)
        got = layer(x)
        pre.remove(), post.remove()
        assert seen == ["pre"]
        torch.testing.assert_close(got, want + plain)  # the hook doubled the base output
        hook = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
        try:
            layer(x)
        finally:
            hook.remove()
        assert any(m is base for m in seen)
        base.forward = lambda inp: torch.nn.functional.linear(inp, base.weight, base.bias) + 1.0
        try:
            torch.testing.assert_close(layer(x), want + 1.0)
        finally:
            del base.forward
        torch.testing.assert_close(layer(x), want)


def _two_adapter_mlp(targets: list[str]):
    """The MLP with adapters "default" and "other" on ``targets``, non-zero B (seed 0)."""
    torch.manual_seed(0)
    pm = get_peft_model(MLP(), LoraConfig(target_modules=targets))
    pm.add_adapter("other", LoraConfig(target_modules=targets))
    randomize_adapters(pm)
    return pm


@pytest.mark.parametrize("grad", [False, True])
def test_hook_on_base_keeps_the_base_output(grad):
    """A forward hook that keeps the base layer's output (activation capture) sees the base output:
    the adapter is never added into a tensor a hook has seen, in single-adapter and mixed batches."""
    pm = _two_adapter_mlp(["lin1"])
    pm.eval()
    layer = pm.base_model.model.lin1
    base = layer.base_layer
    x = torch.randn(4, 20)
    plain = _reference(layer, x, ())
    with torch.set_grad_enabled(grad):
        want = layer(x).detach()
        kept = []
        handle = base.register_forward_hook(lambda m, args, out: kept.append(out))
        try:
            got = layer(x)
            with mixed_batch(["default", "other", "__base__", "default"]):
                got_mixed = layer(x)
        finally:
            handle.remove()
    torch.testing.assert_close(got.detach(), want)
    for out in kept:
        torch.testing.assert_close(out.detach(), plain)
    assert len(kept) == 2
    torch.testing.assert_close(got_mixed[[0, 3]].detach(), want[[0, 3]])
    torch.testing.assert_close(got_mixed[2].detach(), plain[2])


def _road_forbidden(monkeypatch):
    """Make the general forward raise: a call that returns went by Linear's no-grad road."""
    def general(*args, **kwargs):
        raise AssertionError("the general road ran")
    monkeypatch.setattr(LoraLayer, "forward", general)


def _reference(layer, x, names=("default",)):
    """Base output plus each named adapter (none: the base output), written out with autograd's
    ops (no road)."""
    base = layer.base_layer
    out = torch.nn.functional.linear(x, base.weight, base.bias)
    for n in names:
        out = out + layer.scaling[n] * (x @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T)
    return out.detach()


@pytest.mark.parametrize("shape", [(20,), (3, 20), (4, 1, 20), (2, 3, 2, 20), (0, 1, 20), "transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_no_grad_road_equals_the_autograd_forward(shape, bias, monkeypatch):
    """Without autograd a plain LoRA Linear computes ``x Wᵀ + b + s (x Aᵀ) Bᵀ`` by its own road
    (2-D GEMMs on kept transposed views): the same output as with autograd, for any input rank,
    an empty batch and a non-contiguous input, with one and with two active adapters."""
    torch.manual_seed(0)
    pm = get_peft_model(MLP(bias=bias), LoraConfig(target_modules=["lin1"]))
    pm.add_adapter("other", LoraConfig(target_modules=["lin1"], r=4, lora_alpha=3))
    randomize_adapters(pm)
    layer = pm.base_model.model.lin1
    x = torch.randn(5, 20).T.contiguous().T if shape == "transposed" else torch.randn(shape)
    for names in (["default"], ["default", "other"]):
        pm.set_adapter(names)
        want = layer(x).detach()  # with autograd: the general road
        torch.testing.assert_close(want, _reference(layer, x, names))
        with monkeypatch.context() as patch:
            _road_forbidden(patch)
            for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):  # a plan made in one, used in the other
                with mode():
                    got = layer(x)
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert layer._road.dtype is torch.float32 and [a.name for a in layer._road.adapters] == names


def test_no_grad_road_is_left_when_the_layer_is_not_plain(monkeypatch):
    """The no-grad road is taken only in the plain state; otherwise the general forward runs, with
    its own results: dropout in training mode, DoRA, lora_bias, a merged adapter, a disabled
    adapter, a mixed batch, autocast, a hook on the base layer."""
    calls = []
    general = LoraLayer.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return general(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "forward", counting)
    x = torch.randn(3, 20)

    def build(**cfg):
        torch.manual_seed(0)
        pm = get_peft_model(MLP(), LoraConfig(target_modules=["lin1"], **cfg))
        randomize_adapters(pm)
        return pm, pm.base_model.model.lin1

    def general_ran(fn):
        calls.clear()
        with torch.no_grad():
            out = fn()
        return bool(calls), out

    pm, layer = build()
    assert general_ran(lambda: layer(x)) == (False, pytest.approx(layer(x).detach()))  # plain: the road
    pm, layer = build(lora_dropout=0.5)
    pm.train()
    ran, a = general_ran(lambda: layer(x))
    assert ran and not torch.allclose(a, general_ran(lambda: layer(x))[1])  # dropout drew new masks
    pm.eval()
    assert not general_ran(lambda: layer(x))[0]  # dropout is a no-op in eval: the road
    for cfg in ({"use_dora": True}, {"lora_bias": True}):
        pm, layer = build(**cfg)
        ran, out = general_ran(lambda: layer(x))
        assert ran
        torch.testing.assert_close(out, layer(x).detach())
    pm, layer = build()
    want = _reference(layer, x)
    pm.merge_adapter()
    ran, out = general_ran(lambda: layer(x))
    assert ran
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    with pm.disable_adapter():
        ran, out = general_ran(lambda: layer(x))
    assert ran
    torch.testing.assert_close(out, _reference(layer, x, ()))
    with mixed_batch(["default", "__base__", "default"]):
        assert general_ran(lambda: layer(x))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ran, out = general_ran(lambda: layer(x))
    assert ran and out.dtype == torch.bfloat16
    handle = layer.base_layer.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    ran, out = general_ran(lambda: layer(x))
    handle.remove()
    assert ran
    # the base saw 2x, the adapter x
    torch.testing.assert_close(out, _reference(layer, 2 * x, ()) + _reference(layer, x) - _reference(layer, x, ()))
    assert not general_ran(lambda: layer(x))[0]  # hook gone: the road again


def test_no_grad_road_follows_weights_and_adapter_changes():
    """The road keeps transposed views of the weights between calls. A weight given new storage
    (``.data =``, a load with ``assign=True``, ``.to()``), updated in place, a replaced adapter
    module, a changed scaling, another active adapter, a deleted one, a model built on the meta
    device and loaded later: the next forward uses what the layer holds now."""
    pm = _two_adapter_mlp(["lin1"])
    layer = pm.base_model.model.lin1
    x = torch.randn(3, 20)

    def check(names=("default",), xx=None):
        xx = x if xx is None else xx
        with torch.inference_mode():
            got = layer(xx)
        torch.testing.assert_close(got, _reference(layer, xx, names))

    check()
    B = layer.lora_B["default"].weight
    B.data = torch.randn_like(B)  # new storage, same Parameter
    check()
    layer.base_layer.weight.data = torch.randn_like(layer.base_layer.weight)
    check()
    with torch.no_grad():
        B.mul_(3)  # in place, outside inference mode
        layer.lora_A["default"].weight.add_(1)
    check()
    layer.lora_A["default"] = nn.Linear(20, 8, bias=False)  # a new module
    check()
    layer.scaling["default"] = 0.5
    check()
    pm.set_adapter("other")
    check(("other",))
    pm.set_adapter("default")
    check()
    pm.delete_adapter("other")
    check()
    state = {k: v.clone() + 1 for k, v in pm.state_dict().items()}
    pm.load_state_dict(state, assign=True)  # new Parameter objects
    check()
    pm.double()
    check(xx=x.double())
    out = layer(x.double())  # and autograd works after no-grad calls
    out.sum().backward()
    assert layer.lora_B["default"].weight.grad is not None

    with torch.device("meta"):
        meta = get_peft_model(MLP(), LoraConfig(target_modules=["lin1"]))
    with torch.inference_mode():
        assert meta(torch.randn(3, 10, device="meta")).shape == (3, 2)
    meta.load_state_dict(state, assign=True)
    layer = meta.base_model.model.lin1
    check()
    assert layer._road is not None and layer._road.dtype is torch.float32


def test_set_adapter_drops_the_mixed_batch_stacks():
    """Mixed batches cache the stacked adapter weights, checked by tensor versions, which a weight
    replaced through ``.data`` does not change: ``set_adapter`` drops the stacks (as the README says)."""
    pm = _two_adapter_mlp(["lin1"])
    layer = pm.base_model.model.lin1
    x = torch.randn(2, 10)
    names = ["default", "other"]
    with torch.inference_mode():
        pm(x, adapter_names=names)
        B = layer.lora_B["other"].weight
        B.data = torch.randn_like(B)
        pm.set_adapter("default")
        got = pm(x, adapter_names=names)
        pm.set_adapter("other")
        torch.testing.assert_close(got[1], pm(x[1:])[0])


def test_torch_compile_traces_lora_layers_without_graph_breaks():
    """torch.compile (dynamo, eager backend: no C++ compiler needed) traces LoRA layers in one graph
    with no mixed batch open, with and without autograd, and gives the eager outputs; a compiled
    mixed batch still routes rows (dynamo guards on the open-batch count and recompiles)."""
    import torch._dynamo as dynamo

    pm = _two_adapter_mlp(["lin1", "lin2"])
    pm.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        want = pm(x)
        assert dynamo.explain(pm)(x).graph_break_count == 0
        dynamo.reset()
        compiled = torch.compile(pm, backend="eager")
        torch.testing.assert_close(compiled(x), want)
        names = ["default", "other", "__base__", "default"]
        want_mixed = pm(x, adapter_names=names)
        torch.testing.assert_close(compiled(x, adapter_names=names), want_mixed)
        torch.testing.assert_close(compiled(x), want)  # the count is back to 0: the plain graph again
    assert dynamo.explain(pm)(x).graph_break_count == 0  # with autograd
    out = compiled(x)
    out.sum().backward()
    assert pm.base_model.model.lin1.lora_B["default"].weight.grad is not None
    dynamo.reset()


def test_mixed_batch_open_in_another_thread_does_not_route_this_one():
    """The open-batch count is process-wide, the batch itself per thread: a mixed batch open in one
    thread leaves another thread's forwards on the active adapter."""
    import threading

    pm = _two_adapter_mlp(["lin1"])
    x = torch.randn(2, 10)
    with torch.no_grad():
        want = pm(x)
        opened, done = threading.Event(), threading.Event()

        def hold_open():
            with mixed_batch(["other", "other"]):
                opened.set()
                done.wait(10)

        thread = threading.Thread(target=hold_open)
        thread.start()
        try:
            assert opened.wait(10)
            torch.testing.assert_close(pm(x), want)
            torch.testing.assert_close(pm(x, adapter_names=["other", "default"])[1], want[1])
        finally:
            done.set()
            thread.join()
