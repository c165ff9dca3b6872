"""The serve engine's running batch (peftkit.serve.batch): rows that join and leave a batch whose cache
layers are written in place each step, each row computing what it computes alone."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.serve.batch import ROOM, RunningBatch, SlackLayer, build_prefill

CPU = torch.device("cpu")


def _alone(model, prompt, steps):
    """Greedy tokens of ``prompt`` run by itself (transformers' generate, no padding)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prefill(model, prompts):
    pre = build_prefill(model, prompts, [None] * len(prompts), CPU, torch.float32)
    out = model(**pre.inputs, use_cache=True)
    return pre, out.logits[:, -1].argmax(-1).tolist()


def test_rows_join_and_leave_and_each_equals_itself_alone():
    model, _ = peftkit.load_model()
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 8, 6)]
    steps = ROOM + 12  # past the buffers' room: one rebuild for want of free columns
    want = [_alone(model, p, steps) for p in prompts]
    batch = RunningBatch()
    got: dict[int, list[int]] = {}
    with torch.inference_mode():
        pre, first = _prefill(model, prompts[:3])  # three rows start
        batch.add([0, 1, 2], pre.inputs["past_key_values"], pre.inputs["attention_mask"])
        lengths = {i: n for i, n in zip((0, 1, 2), pre.lengths)}
        for i, t in zip((0, 1, 2), first):
            got[i] = [t]
        assert all(isinstance(layer, SlackLayer) for layer in batch.cache.layers)
        buffers, joined_in_place = set(), None
        for step in range(steps + 10):
            if step in (3, 8):  # two rows join mid-way: longer than the others (a rebuild), then shorter (in place)
                new = (3, 4) if step == 3 else (5, 6)
                pre, first = _prefill(model, [prompts[i] for i in new])
                before = batch.cache.layers[0].keys.data_ptr()
                batch.add(list(new), pre.inputs["past_key_values"], pre.inputs["attention_mask"])
                if step == 8:
                    joined_in_place = batch.cache.layers[0].keys.data_ptr() == before
                lengths.update({i: n for i, n in zip(new, pre.lengths)})
                for i, t in zip(new, first):
                    got[i] = [t]
            rows = batch.rows
            inputs = batch.step_inputs([got[r][-1] for r in rows], [lengths[r] for r in rows])
            buffers.add(batch.cache.layers[0].keys.data_ptr())
            logits = model(**inputs, use_cache=True).logits[:, -1]
            for r, t in zip(rows, logits.argmax(-1).tolist()):
                got[r].append(t)
                lengths[r] += 1
            # rows leave when they have their tokens (row 1 early, at step 10)
            keep = [j for j, r in enumerate(rows) if len(got[r]) < steps and not (r == 1 and step == 10)]
            batch.keep(keep)
            if not batch.rows:
                break
    assert got[1] == want[1][:len(got[1])] and len(got[1]) == 12
    for i in (0, 2, 3, 4, 5, 6):
        assert got[i] == want[i], i
    assert joined_in_place
    # the cache is written in place: a new buffer only when rows join longer, columns run out or free up
    assert len(buffers) <= 6


def test_a_step_writes_one_free_column_and_refuses_when_there_is_none():
    k = torch.randn(2, 3, 4, 5)
    layer = SlackLayer(k, k + 1, room=1)
    assert layer.keys.shape == (2, 3, 5, 5) and layer.get_seq_length() == 4
    new = torch.randn(2, 3, 1, 5)
    keys, values = layer.update(new, new)
    assert keys.data_ptr() == layer.keys.data_ptr() and torch.equal(keys[:, :, 4], new[:, :, 0])
    assert torch.equal(keys[:, :, :4], k) and torch.equal(values[:, :, :4], k + 1)
    with pytest.raises(RuntimeError, match="free column"):
        layer.update(new, new)


def _cache(rows, columns, seed, layers=2):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.randn(rows, 2, columns, 4, generator=g), torch.randn(rows, 2, columns, 4, generator=g), i)
    return cache


def test_rows_join_into_free_rows_and_leave_by_moving_the_last_rows():
    batch = RunningBatch(max_rows=8)
    first = _cache(4, 6, 0)
    want = [(layer.keys.clone(), layer.values.clone()) for layer in first.layers]
    batch.add(["a", "b", "c", "d"], first, torch.ones(4, 6, dtype=torch.long))
    assert batch.capacity == 8  # free rows (at least 16, a quarter of the rows) up to max_rows
    ptr = batch.cache.layers[0].keys.data_ptr()
    # two rows of 3 entries join: into rows 4-5, right-aligned with the 6 written columns, no copy of a-d
    joining = _cache(2, 3, 1)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    batch.add(["e", "f"], joining, mask)
    layer = batch.cache.layers[1]
    assert batch.cache.layers[0].keys.data_ptr() == ptr and batch.rows == ["a", "b", "c", "d", "e", "f"]
    assert torch.equal(layer.keys[4:6, :, 3:6], joining.layers[1].keys)
    assert torch.equal(batch.mask[4:6, :6], torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]))
    # b and d leave: e and f move into their places, a and c stay; nothing else is copied
    batch.keep([0, 2, 4, 5])
    assert batch.rows == ["a", "e", "c", "f"] and batch.cache.layers[0].keys.data_ptr() == ptr
    k, v = batch.cache.layers[0].live(4)
    assert torch.equal(k[0], want[0][0][0]) and torch.equal(k[2], want[0][0][2])
    assert torch.equal(v[1, :, 3:], joining.layers[0].values[0]) and torch.equal(v[3, :, 3:], joining.layers[0].values[1])
    assert torch.equal(batch.mask[:4, :6], torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1], [1] * 6, [0, 0, 0, 1, 1, 1]]))
    # a decode step reads the 4 rows' whole buffers: the free columns are masked
    inputs = batch.step_inputs([1, 2, 3, 4], [6, 3, 6, 2])
    assert inputs["attention_mask"].shape == (4, 6 + ROOM) and inputs["attention_mask"][:, 6].eq(1).all()
    keys, _ = batch.cache.layers[0].update(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))
    batch.cache.layers[1].update(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4))
    assert keys.shape[0] == 4 and keys.data_ptr() == ptr and keys[:, :, 6].eq(1).all()
    # a row joins into a row that another left: the stale entries there are masked out
    batch.add(["g"], _cache(1, 2, 3), torch.ones(1, 2, dtype=torch.long))
    assert batch.rows[4] == "g" and batch.cache.layers[0].keys.data_ptr() == ptr
    assert torch.equal(batch.mask[4, :batch.used], torch.tensor([0] * 5 + [1, 1]))


def test_a_longer_row_or_a_full_batch_rebuilds_and_freed_left_columns_are_cut():
    batch = RunningBatch(max_rows=3)
    batch.add(["a", "b"], _cache(2, 4, 0), torch.ones(2, 4, dtype=torch.long))
    assert batch.capacity == 3
    long = _cache(1, 40, 1)
    batch.add(["c"], long, torch.ones(1, 40, dtype=torch.long))  # longer than the written columns
    assert batch.used == 40 and torch.equal(batch.mask[:2, :36].sum(), torch.tensor(0))
    assert torch.equal(batch.cache.layers[0].live(3)[0][2], long.layers[0].keys[0])
    batch.add(["d"], _cache(1, 4, 2), torch.ones(1, 4, dtype=torch.long))  # no free row: rebuilt
    assert batch.rows == ["a", "b", "c", "d"] and batch.capacity == 4
    keys_a = batch.cache.layers[0].live(4)[0][0, :, 36:].clone()
    batch.keep([0, 1, 3])  # c leaves: 36 columns no row uses any more are cut off the left
    assert batch.used == 4 and batch.rows == ["a", "b", "d"]
    assert torch.equal(batch.cache.layers[0].live(3)[0][0], keys_a)


def test_random_joins_and_leaves_each_row_equals_itself_alone():
    """Rows of random lengths join at random steps and leave after random token counts, in a batch of
    at most 6 rows: every path (join in place or by a rebuild, leave by moving rows, left columns cut,
    no free column) is taken, and every row's greedy tokens equal its tokens alone."""
    import random

    model, _ = peftkit.load_model()
    model.eval()
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    jobs = []  # (join step, prompt, tokens wanted)
    for i in range(14):
        length = rng.choice([2, 4, 9, 25, 60]) if i else 70  # a long first row: its leaving frees columns
        jobs.append((rng.randrange(0, 50) if i else 0, torch.randint(3, 500, (length,), generator=g).tolist(),
                     rng.randrange(1, ROOM + 20) if i else 12))
    want = [_alone(model, p, n) for _, p, n in jobs]
    batch = RunningBatch(max_rows=6)
    got: dict[int, list[int]] = {}
    lengths: dict[int, int] = {}
    waiting = sorted(range(len(jobs)), key=lambda i: jobs[i][0])
    paths = set()
    with torch.inference_mode():
        step = 0
        while waiting or batch.rows:
            joining = [i for i in waiting if jobs[i][0] <= step][:6 - len(batch)]
            if joining:
                for i in joining:
                    waiting.remove(i)
                pre, first = _prefill(model, [jobs[i][1] for i in joining])
                before = (batch.cache.layers[0].keys.data_ptr(), batch.used) if batch.rows else None
                batch.add(joining, pre.inputs["past_key_values"], pre.inputs["attention_mask"])
                if before is not None:
                    paths.add("join in place" if batch.cache.layers[0].keys.data_ptr() == before[0] else "join rebuilt")
                for i, t, n in zip(joining, first, pre.lengths):
                    got[i], lengths[i] = [t], n
            keep = [j for j, r in enumerate(batch.rows) if len(got[r]) < jobs[r][2]]
            if len(keep) < len(batch.rows):
                used = batch.used
                batch.keep(keep)
                if batch.rows and batch.used < used:
                    paths.add("left columns cut")
            if batch.rows:
                rows = batch.rows
                ptr = batch.cache.layers[0].keys.data_ptr()
                inputs = batch.step_inputs([got[r][-1] for r in rows], [lengths[r] for r in rows])
                if batch.cache.layers[0].keys.data_ptr() != ptr:
                    paths.add("no free column")
                logits = model(**inputs, use_cache=True).logits[:, -1]
                for r, t in zip(rows, logits.argmax(-1).tolist()):
                    got[r].append(t)
                    lengths[r] += 1
            step += 1
    for i, (_, _, n) in enumerate(jobs):
        assert got[i][:n] == want[i], i
    assert paths == {"join in place", "join rebuilt", "left columns cut", "no free column"}, paths


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_decode_attention_equals_sdpa_for_one_token_steps_and_hands_the_rest_to_it(kv_heads):
    import torch.nn.functional as F

    from peftkit.serve.batch import decode_attention

    g = torch.Generator().manual_seed(kv_heads)
    B, H, W, D = 5, 4, 11, 8
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, kv_heads, W, D, generator=g), torch.randn(B, kv_heads, W, D, generator=g)
    allowed = torch.rand(B, 1, 1, W, generator=g) > 0.3
    allowed[..., -1] = True  # every row sees its own new entry
    rep = H // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=allowed, scale=0.3).transpose(1, 2)
    module = torch.nn.Module()
    got, _ = decode_attention(module, q, k, v, allowed, scaling=0.3)
    assert got.shape == (B, 1, H, D) and torch.allclose(got, want, atol=1e-6)
    additive = torch.zeros(B, 1, 1, W).masked_fill(~allowed, float("-inf"))
    assert torch.allclose(decode_attention(module, q, k, v, additive, scaling=0.3)[0], want, atol=1e-6)
    plain = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)).transpose(1, 2)
    assert torch.allclose(decode_attention(module, q, k, v, None)[0], plain, atol=1e-6)  # scaling 1/sqrt(D)
    # a prefill (several query tokens) is transformers' SDPA itself
    q3 = torch.randn(B, H, 3, D, generator=g)
    mask3 = torch.ones(B, 1, 3, W, dtype=torch.bool)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module.is_causal, module.num_key_value_groups = False, rep
    assert torch.equal(decode_attention(module, q3, k, v, mask3, scaling=0.3)[0],
                       sdpa_attention_forward(module, q3, k, v, mask3, scaling=0.3)[0])


def test_the_engine_decodes_with_its_attention_on_cpus():
    from peftkit.serve.batch import DECODE
    from peftkit.serve.engine import Engine
    from peftkit.serve.host import AdapterHost

    model, tok = peftkit.load_model()
    assert model.config._attn_implementation == "sdpa"
    Engine(AdapterHost(model, "base"), None, tok)
    assert model.config._attn_implementation == DECODE
    prompt = [5, 17, 80, 3, 44]
    with torch.inference_mode():  # the model still generates as before (prefill: SDPA; steps: the products)
        pre, first = _prefill(model, [prompt])
        batch = RunningBatch()
        batch.add([0], pre.inputs["past_key_values"], pre.inputs["attention_mask"])
        tokens = [first[0]]
        for step in range(6):
            inputs = batch.step_inputs([tokens[-1]], [len(prompt) + step])
            tokens.append(int(model(**inputs, use_cache=True).logits[0, -1].argmax()))
    fresh, _ = peftkit.load_model()
    assert tokens == _alone(fresh.eval(), prompt, 7)


def test_a_first_piece_leaves_room_for_the_rows_joining_after_it():
    batch = RunningBatch(max_rows=200)
    batch.add(list(range(40)), _cache(40, 9, 0), torch.ones(40, 9, dtype=torch.long), more=60)
    assert batch.capacity == 100  # 40 rows and the 60 announced (more than a quarter, more than 16)
    ptr = batch.cache.layers[0].keys.data_ptr()
    for start in (40, 70):  # the shorter pieces after it join in place
        batch.add(list(range(start, start + 30)), _cache(30, 7, start), torch.ones(30, 7, dtype=torch.long))
    assert len(batch) == 100 and batch.cache.layers[0].keys.data_ptr() == ptr
    assert torch.equal(batch.mask[40:100, :9].sum(1), torch.full((60,), 7))
