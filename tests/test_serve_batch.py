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
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12)]
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
        buffers = set()
        for step in range(steps + 6):
            if step == 3:  # two rows join mid-way
                pre, first = _prefill(model, prompts[3:])
                batch.add([3, 4], pre.inputs["past_key_values"], pre.inputs["attention_mask"])
                lengths.update({i: n for i, n in zip((3, 4), pre.lengths)})
                for i, t in zip((3, 4), first):
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
    for i in (0, 2, 3, 4):
        assert got[i] == want[i], i
    # the cache is written in place: a new buffer only when rows join or leave or the room runs out
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
