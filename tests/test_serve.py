"""peftkit serve: a real server on 127.0.0.1 and the real `openai` client (see tests/serve_util.py).

Every generated token is checked against offline ``model.generate(..., adapter_names=[name])``; bad
requests get their OpenAI-style error and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from peftkit.serve.engine import SamplingParams, pick_tokens  # noqa: E402
from peftkit.serve.protocol import ChatMessage, chat_prompt_ids  # noqa: E402
from peftkit.serve.server import ServeOptions  # noqa: E402
from peftkit.serve.text import TextStream  # noqa: E402

from .serve_util import KINDS, http, make_adapters, offline_model, offline_tokens, running_server  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a bird"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One adapter of each kind: {name: folder}."""
    return make_adapters(tmp_path_factory.mktemp("adapters"), len(KINDS))


@pytest.fixture(scope="module")
def offline(kinds):
    return offline_model(kinds)


@pytest.fixture(scope="module")
def served(kinds):
    with running_server(ServeOptions(adapters=list(kinds.items()), max_adapters=len(kinds))) as (url, server):
        yield url, server


def client(url, key="unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def ids_of(choice):
    return choice.model_extra["token_ids"]


def test_every_kind_equals_offline_generate_streaming_and_not(served, kinds, offline):
    url, server = served
    c = client(url)
    tok = server.tokenizer
    listed = [m.id for m in c.models.list().data]
    assert listed == [server.base_name] + list(kinds)
    outputs = set()
    for name in kinds:
        for prompt in PROMPTS[:2]:
            ref = offline_tokens(offline[name], tok, prompt, 10, name)
            r = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"return_token_ids": True})
            assert ids_of(r.choices[0]) == ref, (name, prompt)
            assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
            assert r.usage.prompt_tokens == len(tok(prompt).input_ids) and r.usage.completion_tokens == len(ref)
            stream = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                          extra_body={"return_token_ids": True})
            chunks = list(stream)
            assert [t for ch in chunks for t in ids_of(ch.choices[0])] == ref
            assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            outputs.add(tuple(ref))
    assert len(outputs) >= len(kinds)  # the adapters change the outputs: a crossed row would show


def test_base_model_rows_equal_the_plain_model(served):
    url, server = served
    tok = server.tokenizer
    import peftkit

    model, _ = peftkit.load_model()
    ref = offline_tokens(model.eval(), tok, PROMPTS[2], 12, None)
    r = client(url).completions.create(model=server.base_name, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert ids_of(r.choices[0]) == ref


def test_chat_uses_the_plain_chat_format_and_streams(served, kinds, offline):
    url, server = served
    tok = server.tokenizer
    name = next(iter(kinds))
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A dog"}]
    ids = chat_prompt_ids(tok, [ChatMessage(**m) for m in messages])
    assert tok.decode(ids, skip_special_tokens=True).endswith("User: A dog\nAssistant: ")
    with torch.no_grad():
        out = offline[name].generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                     adapter_names=[name], pad_token_id=tok.eos_token_id)
    ref = out[0, len(ids):].tolist()
    c = client(url)
    r = c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert ids_of(r.choices[0]) == ref
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    chunks = list(c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(ref) and chunks[-1].choices == []


def test_sampling_n_seed_stop_and_logprobs(served, kinds):
    url, server = served
    c = client(url)
    name = list(kinds)[1]
    a = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.9, seed=7, n=3)
    b = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.9, seed=7, n=3)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]  # seeded: reproducible
    assert len({x.text for x in a.choices}) > 1 and [x.index for x in a.choices] == [0, 1, 2]
    greedy = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    stop = greedy[4:7]
    cut = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == greedy[:greedy.index(stop)] and cut.finish_reason == "stop"
    lp = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3,
                              extra_body={"return_token_ids": True}).choices[0]
    tokens = ids_of(lp)
    model = server.host.base
    ids = server.tokenizer(PROMPTS[0]).input_ids
    from peftkit.core.mixed import mixed_batch

    with torch.no_grad(), mixed_batch([server.host.layer_name(name)]):
        logits = model(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:]
    ref = torch.log_softmax(logits.float(), -1)
    got = lp.logprobs.token_logprobs
    assert got == pytest.approx([float(ref[i, t]) for i, t in enumerate(tokens)], abs=1e-4)
    assert all(len(top) == 3 for top in lp.logprobs.top_logprobs)
    chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3
    assert all(len(e.top_logprobs) == 2 for e in chat.choices[0].logprobs.content)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, kinds):
    url, server = served
    c = client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=server.base_name, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        c.completions.create(model=server.base_name, prompt="x", max_tokens=4000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=server.base_name, prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        c.completions.create(model=server.base_name, prompt="x", max_tokens=2, presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        c.completions.create(model=server.base_name, prompt=[10**7], max_tokens=2)
    raw = http("POST", url + "/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as s:  # a body declared over the limit is refused unread
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 2000000\r\n\r\n{")
        reply = b""
        while b"}}" not in reply:  # the headers and the JSON error body
            part = s.recv(65536)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 413") and b"bytes" in reply
    assert http("GET", url + "/nowhere").json()["error"]["message"]
    # a client that disconnects mid-stream: its rows leave the batch, and the server goes on
    _disconnect_mid_stream(url, next(iter(kinds)))
    deadline = time.monotonic() + 60
    while server.engine.batch.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.engine.batch.rows
    r = c.completions.create(model=next(iter(kinds)), prompt="x", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"
    assert http("GET", url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def _disconnect_mid_stream(url: str, model: str) -> None:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps({"model": model, "prompt": "Once", "max_tokens": 400, "stream": True, "ignore_eos": True,
                       "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while b"data:" not in seen:  # the headers, then the first event: generation is running
            part = s.recv(4096)
            assert part, "the server closed the stream"
            seen += part


def test_metrics_and_health(served, kinds):
    url, server = served
    client(url).completions.create(model=list(kinds)[2], prompt="x", max_tokens=2, temperature=0)
    text = http("GET", url.removesuffix("/v1") + "/metrics").text
    assert f'peftkit_requests_total{{model="{list(kinds)[2]}",status="200"}}' in text
    for name in ("peftkit_time_to_first_token_seconds_bucket", "peftkit_time_per_output_token_seconds_count",
                 "peftkit_queue_length", "peftkit_batch_rows_bucket", "peftkit_generation_tokens_total",
                 "peftkit_adapter_events_total"):
        assert name in text, name


# ---------------------------------------------------------------------------------------------
# keys, tenants, runtime loading


def test_tenants_see_and_use_only_their_models(kinds, tmp_path):
    names = list(kinds)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"key": "sk-tenant-a-123", "tenant": "a", "models": [names[0], names[1]]},
        {"key": "sk-tenant-b-123", "tenant": "b", "models": ["stories260k", names[2]]},
        {"key": "sk-admin-12345", "tenant": "ops", "models": "*", "admin": True}]}))
    opts = ServeOptions(adapters=list(kinds.items()), api_keys_file=str(keys), adapter_dirs=[str(tmp_path)])
    with running_server(opts) as (url, server):
        a, b = client(url, "sk-tenant-a-123"), client(url, "sk-tenant-b-123")
        assert [m.id for m in a.models.list().data] == names[:2]
        assert [m.id for m in b.models.list().data] == ["stories260k", names[2]]
        with pytest.raises(openai.NotFoundError):
            a.completions.create(model=names[2], prompt="x", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            b.completions.create(model=names[0], prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client(url, "sk-wrong-key").models.list()
        no_key = http("POST", url + "/completions", {"model": names[0], "prompt": "x", "max_tokens": 2})
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        load = {"lora_name": "extra", "lora_path": kinds[names[0]]}
        denied = http("POST", url + "/load_lora_adapter", load, headers={"Authorization": "Bearer sk-tenant-a-123"})
        assert denied.status_code == 403
        assert a.completions.create(model=names[0], prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_runtime_load_unload_and_path_checks(kinds, tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    extra = make_adapters(root, 2, kinds=["lora", "prefix"])
    outside = next(iter(kinds.values()))
    os.symlink(outside, root / "escape")
    opts = ServeOptions(adapters=[], adapter_dirs=[str(root)], max_adapters=1)
    with running_server(opts) as (url, server):
        assert [m.id for m in client(url).models.list().data][1:] == list(extra)  # scanned at start
        post = lambda path, body: http("POST", url + path, body)  # noqa: E731
        assert post("/load_lora_adapter", {"lora_name": "x", "lora_path": outside}).status_code == 403
        assert post("/load_lora_adapter", {"lora_name": "x", "lora_path": "escape"}).status_code == 403
        assert post("/load_lora_adapter", {"lora_name": "x", "lora_path": "../"}).status_code == 403
        assert post("/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}).status_code == 404
        clash = post("/load_lora_adapter", {"lora_name": list(extra)[0], "lora_path": list(extra)[0]})
        assert clash.status_code == 409
        ok = post("/load_lora_adapter", {"lora_name": "again", "lora_path": list(extra)[1]})
        assert ok.status_code == 200 and ok.json()["method"] == "PREFIX_TUNING"
        c = client(url)
        outs = {n: c.completions.create(model=n, prompt="Once", max_tokens=6, temperature=0).choices[0].text
                for n in [*extra, "again"]}
        assert outs["again"] == outs[list(extra)[1]]  # same folder, same outputs, after evictions (max 1)
        text = http("GET", url.removesuffix("/v1") + "/metrics").text
        assert 'peftkit_adapter_events_total{adapter="again",event="loaded"}' in text
        assert "evicted" in text
        assert post("/unload_lora_adapter", {"lora_name": "again"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="again", prompt="x", max_tokens=2)
        assert post("/unload_lora_adapter", {"lora_name": "again"}).status_code == 404


def test_timeout_and_full_queue(kinds):
    opts = ServeOptions(adapters=list(kinds.items())[:1], request_timeout=0.0)
    with running_server(opts) as (url, server):
        with pytest.raises(openai.APIStatusError) as err:
            client(url).completions.create(model=server.base_name, prompt="x", max_tokens=5)
        assert err.value.status_code == 504 and "timed out" in err.value.message
        server.engine.max_waiting = 0  # a full queue answers 429 at once
        with pytest.raises(openai.RateLimitError, match="busy"):
            client(url).completions.create(model=server.base_name, prompt="x", max_tokens=5)


# ---------------------------------------------------------------------------------------------
# the load test of issue 18: 32 adapters of mixed methods, 256 concurrent requests


@pytest.mark.slow
def test_256_concurrent_requests_over_32_adapters_equal_offline(tmp_path):
    adapters = make_adapters(tmp_path, 32)
    names = list(adapters)
    late = {f"late-{n}": p for n, p in make_adapters(tmp_path / "late", 2, kinds=["lora", "prompt"]).items()}
    jobs = [(names[i % 32], PROMPTS[i % len(PROMPTS)], i % 2 == 0) for i in range(256)]
    opts = ServeOptions(adapters=list(adapters.items()), adapter_dirs=[str(tmp_path / "late")], max_adapters=12)
    with running_server(opts) as (url, server):
        results, late_out = asyncio.run(_load(url, jobs, late))
        tok = server.tokenizer
        events = server.metrics.adapter_events
        evicted = sum(s.value for m in events.collect() for s in m.samples if s.labels.get("event") == "evicted")
    assert evicted > 0  # adapters were evicted and re-installed during the run
    offline = offline_model({**adapters, **late})
    refs: dict = {}
    for (name, prompt, _), got in zip(jobs, results):
        if (name, prompt) not in refs:
            refs[name, prompt] = offline_tokens(offline[name], tok, prompt, 12, name)
        assert got == refs[name, prompt], (name, prompt)
    for name, got in late_out.items():
        assert got == offline_tokens(offline[name], tok, PROMPTS[0], 12, name)
    assert len(set(map(tuple, refs.values()))) >= 28  # outputs differ by adapter: nothing crossed


async def _load(url, jobs, late):
    c = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)

    async def one(name, prompt, stream):
        kw = dict(model=name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
        if not stream:
            return ids_of((await c.completions.create(**kw)).choices[0])
        return [t async for ch in await c.completions.create(stream=True, **kw) for t in ids_of(ch.choices[0])]

    async def admin():  # adapters loaded during the run, used, and one unloaded
        out = {}
        for name, path in late.items():
            r = await asyncio.to_thread(http, "POST", url + "/load_lora_adapter", {"lora_name": name, "lora_path": path})
            assert r.status_code == 200, r.text
            out[name] = await one(name, PROMPTS[0], False)
        r = await asyncio.to_thread(http, "POST", url + "/unload_lora_adapter", {"lora_name": list(late)[0]})
        assert r.status_code == 200, r.text
        return out

    tasks = [one(*j) for j in jobs]
    *results, late_out = await asyncio.gather(*tasks, admin())
    return results, late_out


# ---------------------------------------------------------------------------------------------
# pieces


def test_text_stream_holds_back_stop_strings_and_partial_characters():
    import peftkit

    _, tok = peftkit.load_model()
    ids = tok("Once upon a time there was a dog.", add_special_tokens=False).input_ids
    s = TextStream(tok, stop=["a dog"])
    out = "".join(s.push(t) for t in ids) + s.finish()
    assert out == "Once upon a time there was " and s.stopped
    plain = TextStream(tok)
    assert "".join(plain.push(t) for t in ids) + plain.finish() == tok.decode(ids, skip_special_tokens=True)


def test_pick_tokens_greedy_top_p_and_seeded_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert [t for t, _, _ in pick_tokens(logits, [greedy, greedy], [None, None])] == [1, 0]
    # probabilities 0.024, 0.478, 0.065, 0.433: top_p 0.5 keeps tokens 1 and 3, top_p 0.4 token 1 only
    for top_p, allowed in ((0.5, {1, 3}), (0.4, {1}), (1.0, {0, 1, 2, 3})):
        p = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
        picks = {pick_tokens(logits[:1], [p], [torch.Generator().manual_seed(s)])[0][0] for s in range(200)}
        assert picks == allowed, top_p


def test_length_groups_cut_padding_and_keep_every_row():
    from peftkit.serve.engine import length_groups

    lengths = [10, 100, 12, 95, 11, 50, 98]
    groups = length_groups(list(range(7)), lengths)
    assert sorted(i for g in groups for i in g) == list(range(7)) and len(groups) <= 4
    for g in groups:  # each group pads at most 25% over its real tokens (or is the last one allowed)
        assert max(lengths[i] for i in g) * len(g) <= 1.25 * sum(lengths[i] for i in g) or g is groups[-1]
    assert length_groups([], []) == [] and length_groups(["x"], [5]) == [["x"]]


def test_prefill_pieces_bound_the_padded_tokens_of_a_forward():
    from peftkit.serve.engine import prefill_pieces

    lengths = [10, 30, 20, 20, 50, 5, 5]
    pieces = prefill_pieces(list(range(7)), lengths, 60)
    assert [i for p in pieces for i in p] == list(range(7))  # every row once, in order
    assert pieces == [[0, 1], [2, 3], [4], [5, 6]]
    assert prefill_pieces(["x"], [500], 60) == [["x"]]  # a row longer than the bound runs alone
    assert prefill_pieces([], [], 60) == []
