"""Prefix tuning on the encoder of encoder-decoder models (``PrefixTuningConfig(encoder_prefix=True)``).

The encoder's self-attention layer ``j`` reads the prefix pair ``(2j+1) mod num_layers`` of the
saved tensor in front of its own keys and values. Checked against attention computed by hand from
the saved tensor for T5 (relative position bias, no scaling) and BART (scaled dot product), with
eager and SDPA attention and a padded row; against single-adapter runs in mixed batches; against
greedy decoding by forward passes; through save/load and Hugging Face PEFT; in training.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from peftkit import ConfigError, PeftkitError, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.prompt.encoder_prefix import encoder_attentions

from .models import _tokens, tiny_bart, tiny_bert_cls, tiny_llama, tiny_t5
from .test_prompt_methods import single

N = 3


def build(kind: str, impl: str = "eager"):
    model = {"t5": tiny_t5, "bart": tiny_bart}[kind]()
    model.config._attn_implementation = impl
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = impl
    return model


def enc_config(**kw) -> PrefixTuningConfig:
    return PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=kw.pop("n", N), encoder_prefix=True, **kw)


def inputs(batch: int = 2):
    ids, dec = _tokens(batch, 6, 64), _tokens(batch, 4, 64, seed=2)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[-1, 4:] = 0  # the last row is padded
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


def stored_pair(pm: PeftModel, name: str, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value of stored pair ``pair`` from the saved tensor, (heads, n, head_dim) each."""
    cfg = pm.peft_config[name]
    z = pm.get_prompt_embedding_to_save(name)[: cfg.num_virtual_tokens]
    H = cfg.num_attention_heads
    z = z.view(cfg.num_virtual_tokens, 2 * cfg.num_layers, H, cfg.token_dim // H).permute(1, 2, 0, 3)
    return z[2 * pair], z[2 * pair + 1]


def hand_attention(kind: str, attn, hidden, pk, pv, text_mask, n, first):
    """Encoder self-attention over [prefix; text] keys, written out from the model's weights
    (T5's relative position bias lives in the first layer, ``first``, and serves every layer)."""
    B, L, _ = hidden.shape
    if kind == "t5":
        q, k, v, o = attn.q, attn.k, attn.v, attn.o
        heads, hd, scale = attn.n_heads, attn.key_value_proj_dim, 1.0
    else:
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        heads, hd, scale = attn.num_heads, attn.head_dim, attn.scaling

    def split(t):
        return t.view(B, -1, heads, hd).transpose(1, 2)

    keys = torch.cat([pk.expand(B, -1, -1, -1), split(k(hidden))], dim=2)
    values = torch.cat([pv.expand(B, -1, -1, -1), split(v(hidden))], dim=2)
    scores = split(q(hidden)) @ keys.transpose(-1, -2) * scale
    if kind == "t5":  # relative positions: prefix keys at 0..n-1, text at n..n+L-1
        ctx = torch.arange(L)[:, None] + n
        mem = torch.arange(n + L)[None, :]
        buckets = first._relative_position_bucket(mem - ctx, bidirectional=True,
                                                  num_buckets=first.relative_attention_num_buckets,
                                                  max_distance=first.relative_attention_max_distance)
        scores = scores + first.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
    keep = torch.cat([torch.ones(B, n, dtype=torch.bool), text_mask.bool()], dim=1)
    scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
    out = torch.softmax(scores, dim=-1) @ values
    return o(out.transpose(1, 2).reshape(B, L, heads * hd))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_each_encoder_layer_attends_to_its_stored_prefix(kind, impl):
    pm = get_peft_model(build(kind, impl), enc_config()).eval()
    attentions = encoder_attentions(pm.base_model)
    assert len(attentions) == 2 and [a.layer_idx for a in attentions] == [0, 1]
    seen = {}

    def capture(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen[module.layer_idx] = (hidden, output[0])

    handles = [a.register_forward_hook(capture, with_kwargs=True) for a in attentions]
    kw = inputs()
    try:
        with torch.no_grad():
            pm(**kw)
    finally:
        for h in handles:
            h.remove()
    L = pm.peft_config["default"].num_layers
    for j, attn in enumerate(attentions):
        pk, pv = stored_pair(pm, "default", (2 * j + 1) % L)
        hidden, got = seen[j]
        with torch.no_grad():
            want = hand_attention(kind, attn, hidden, pk, pv, kw["attention_mask"], N, attentions[0])
        real = kw["attention_mask"].bool()  # padded query positions are not compared
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_prefix_changes_the_encoder_and_is_removed_afterwards(kind):
    model = build(kind)
    pm = get_peft_model(model, enc_config()).eval()
    pm.add_adapter("dec", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    pm.prompt_encoder["dec"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    kw = inputs()
    with torch.no_grad():
        both = pm(**kw)
        pm.set_adapter("dec")
        dec_only = pm(**kw)
        with pm.disable_adapter():
            base = pm(**kw)
    real = kw["attention_mask"].bool()
    assert (both.encoder_last_hidden_state - base.encoder_last_hidden_state)[real].abs().max() > 1e-3
    torch.testing.assert_close(dec_only.encoder_last_hidden_state, base.encoder_last_hidden_state)
    assert not torch.allclose(both.logits, dec_only.logits)
    for attn in encoder_attentions(pm.base_model):  # no hook is left behind
        assert not attn._forward_pre_hooks


def check_mixed_rows(pm, rows, generate):
    """Each row of a mixed batch equals its adapter run alone (logits, and greedy generations)."""
    kw = inputs(len(rows))
    with torch.no_grad():
        mixed = pm(**kw, adapter_names=rows).logits
        for i, name in enumerate(rows):
            alone = single(pm, name, **{k: v[i:i + 1] for k, v in kw.items()}).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=2e-6, rtol=1e-5)
        if not generate:
            return
        gk = {k: v for k, v in kw.items() if k != "decoder_input_ids"}
        gen = pm.generate(**gk, adapter_names=rows, max_new_tokens=5, do_sample=False)
        for i, name in enumerate(rows):
            row = {k: v[i:i + 1] for k, v in gk.items()}
            if name == "__base__":
                with pm.disable_adapter():
                    alone = pm.generate(**row, max_new_tokens=5, do_sample=False)
            else:
                pm.set_adapter(name)
                alone = pm.generate(**row, max_new_tokens=5, do_sample=False)
            assert torch.equal(gen[i:i + 1, :alone.shape[1]], alone), name


def test_t5_mixed_batch_rows_equal_single_adapter_runs():
    pm = get_peft_model(build("t5"), enc_config(), adapter_name="enc")
    pm.add_adapter("enc2", enc_config(n=5, prefix_projection=True))
    pm.add_adapter("dec", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    pm.add_adapter("pt", PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    check_mixed_rows(pm.eval(), ["enc", "dec", "__base__", "enc2", "pt", "enc"], generate=True)


def test_bart_mixed_batch_of_equal_length_prefixes():
    """BART's decoder counts positions from the cache, so only equal-length prefixes batch; rows with
    and without encoder prefixes may mix."""
    pm = get_peft_model(build("bart"), enc_config(), adapter_name="enc")
    pm.add_adapter("enc2", enc_config(prefix_projection=True))
    pm.add_adapter("dec", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    check_mixed_rows(pm.eval(), ["enc", "dec", "enc2"], generate=True)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_generate_equals_greedy_decoding_by_forward(kind):
    pm = get_peft_model(build(kind), enc_config()).eval()
    kw = inputs(1)
    start = pm.base_model.config.decoder_start_token_id
    pm.base_model.generation_config.forced_eos_token_id = None  # BART forces EOS at max length
    with torch.no_grad():
        gen = pm.generate(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], max_new_tokens=5,
                          do_sample=False, min_new_tokens=5)
        dec = torch.tensor([[start]])
        for _ in range(5):
            logits = pm(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(gen, dec)


def test_training_reaches_the_encoder_pairs_only_with_encoder_prefix():
    grads = {}
    for flag in (False, True):
        cfg = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, encoder_prefix=flag)
        pm = get_peft_model(build("t5"), cfg)
        pm.train()
        kw = inputs()
        labels = kw.pop("decoder_input_ids")
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.1)
        losses = []
        for _ in range(12):
            loss = pm(**kw, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            if not losses:
                g = pm.prompt_encoder["default"].embedding.weight.grad
                grads[flag] = g.view(N, 2 * 2, -1).abs().sum(dim=(0, 2))  # per stored key/value entry
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] * 0.9
    # 2 layers: decoder layers read pair 0 (entries 0, 1); encoder layers read pair 1 (entries 2, 3)
    assert (grads[False][:2] > 0).all() and (grads[False][2:] == 0).all()
    assert (grads[True] > 0).all()


def test_save_load_and_the_config_file(tmp_path):
    pm = get_peft_model(build("t5"), enc_config()).eval()
    pm.add_adapter("dec", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["encoder_prefix"] is True
    assert "encoder_prefix" not in json.loads((tmp_path / "dec" / "adapter_config.json").read_text())
    kw = inputs()
    with torch.no_grad():
        pm.set_adapter("default")
        want = pm(**kw).logits
        loaded = PeftModel.from_pretrained(build("t5"), tmp_path).eval()
        assert loaded.peft_config["default"].encoder_prefix is True
        torch.testing.assert_close(loaded(**kw).logits, want)


def test_hugging_face_peft_reads_the_folder_as_decoder_prefixes(tmp_path):
    peft = pytest.importorskip("peft")
    pm = get_peft_model(build("t5"), enc_config()).eval()
    pm.save_pretrained(tmp_path)
    kw = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("t5"), str(tmp_path)).eval()
    pm.peft_config["default"].encoder_prefix = False  # the same tensor, prefixes on the decoder only
    with torch.no_grad():
        torch.testing.assert_close(theirs(**kw).logits, pm(**kw).logits, atol=1e-5, rtol=1e-4)


def test_bad_input():
    with pytest.raises(ConfigError, match="encoder-decoder"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_prefix=True)
    for model, task in ((tiny_llama(), "CAUSAL_LM"), (tiny_bert_cls(), "SEQ_CLS")):
        cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=2)
        cfg.encoder_prefix = True  # set after validation: the model checks it again
        with pytest.raises(ConfigError, match="encoder-decoder"):
            get_peft_model(model, cfg)
    model = build("t5")
    for module in model.get_encoder().modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = None
    with pytest.raises(PeftkitError, match="encoder_prefix"):
        get_peft_model(model, enc_config())
    pm = get_peft_model(build("t5"), enc_config()).eval()
    kw = inputs()
    enc = pm.base_model.get_encoder()(input_ids=kw["input_ids"])
    with pytest.raises(PeftkitError, match="encoder_outputs"):
        pm(decoder_input_ids=kw["decoder_input_ids"], input_ids=kw["input_ids"], encoder_outputs=enc)


def test_beam_search_with_mixed_encoder_prefixes():
    """The encoder runs once per input row before generate() expands rows for beams."""
    pm = get_peft_model(build("t5"), enc_config(), adapter_name="enc")
    pm.add_adapter("dec", PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    pm.eval()
    ids = inputs(2)["input_ids"]
    gen = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5}
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, adapter_names=["enc", "dec"], **gen)
        for i, name in enumerate(["enc", "dec"]):
            pm.set_adapter(name)
            alone = pm.generate(input_ids=ids[i:i + 1], **gen)
            assert torch.equal(mixed[2 * i:2 * i + 2, :alone.shape[1]], alone), name
