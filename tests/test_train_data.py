"""Data files, formats, loss masking, packing and metrics of the training toolkit (fast tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import peftkit
from peftkit.train.collate import check_packing, collate, pack
from peftkit.train.config import DataConfig
from peftkit.train.data import (
    IGNORE_INDEX,
    DataError,
    detect_format,
    prepare_data,
    read_records,
    resolve_columns,
)
from peftkit.train.loop import loss_sum
from peftkit.train.metrics import MetricSums, exact_match, f1_from_confusion, rouge_l


@pytest.fixture(scope="module")
def lm():
    model, _ = peftkit.load_model()
    return model.eval()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def causal(fmt):
    return "SEQ_CLS" if fmt == "classification" else "CAUSAL_LM"


# -- reading files ------------------------------------------------------------------------------


def test_reads_every_file_type(tmp_path):
    recs = [{"source": "a b", "target": "c"}, {"source": "d", "target": "e f"}]
    js = _write(tmp_path / "d.json", json.dumps(recs))
    wrapped = _write(tmp_path / "w.json", json.dumps({"data": recs}))
    jl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    csv_ = _write(tmp_path / "d.csv", 'source,target\n"a b",c\nd,"e f"\n')
    tsv = _write(tmp_path / "d.tsv", "source\ttarget\na b\tc\nd\te f\n")
    for path in (js, wrapped, jl, csv_, tsv):
        assert read_records(path) == recs, path
    txt = _write(tmp_path / "d.txt", "first doc\nline two\n\nsecond doc\n")
    assert read_records(txt) == [{"text": "first doc\nline two"}, {"text": "second doc"}]
    lines = _write(tmp_path / "l.txt", "one\ntwo\n")
    assert read_records(lines) == [{"text": "one"}, {"text": "two"}]
    eot = _write(tmp_path / "e.txt", "a\n\nb<|endoftext|>c")
    assert read_records(eot) == [{"text": "a\n\nb"}, {"text": "c"}]
    assert read_records(recs) == recs


def test_reads_datasets_objects(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "hello there"}, {"text": "general kenobi"}])
    assert read_records(ds) == [{"text": "hello there"}, {"text": "general kenobi"}]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_records(str(tmp_path / "saved")) == read_records(ds)
    with pytest.raises(DataError, match="one split"):
        read_records(datasets.DatasetDict({"train": ds}))


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ('{"a": 1}\nnot json\n', "line 2"),
    ("[1, 2]", "record 0"),
])
def test_bad_files(tmp_path, content, match):
    path = _write(tmp_path / "bad.jsonl" if "line" in match else tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=match):
        read_records(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(_write(tmp_path / "x.parquet", "x"))
    with pytest.raises(DataError, match="empty"):
        read_records(_write(tmp_path / "e.csv", ""))


# -- formats ------------------------------------------------------------------------------------


def test_detect_format_and_columns():
    assert detect_format(["messages"]) == "chat"
    assert detect_format(["instruction", "input", "output"]) == "instruction"
    assert detect_format(["sentence", "label"]) == "classification"
    assert detect_format(["prompt", "completion"]) == "seq2seq"
    assert detect_format(["text"]) == "text"
    assert detect_format(["mr", "ref"], {"source": "mr", "target": "ref"}) == "seq2seq"
    with pytest.raises(DataError, match="--columns"):
        detect_format(["mr", "ref"])
    assert resolve_columns("seq2seq", ["mr", "ref"], {"source": "mr", "target": "ref"}, "f") == {"source": "mr", "target": "ref"}
    with pytest.raises(DataError, match=r"needs a 'target' column.*\['mr', 'ref'\].*--columns target="):
        resolve_columns("seq2seq", ["mr", "ref"], {"source": "mr"}, "f")
    with pytest.raises(DataError, match="column 'nope'"):
        resolve_columns("seq2seq", ["mr", "ref"], {"source": "nope", "target": "ref"}, "f")
    with pytest.raises(DataError, match="does not have"):
        resolve_columns("text", ["text"], {"label": "text"}, "f")


def test_text_format_trains_every_token_in_windows(tok):
    long = " ".join(["the cat sat on the mat"] * 40)
    data = prepare_data(DataConfig(max_length=32, eval_fraction=0), tok, causal, train_source=[{"text": long}])
    exs = data.train.examples
    assert data.format == "text" and len(exs) > 1
    assert all(len(e.input_ids) <= 32 and e.labels == e.input_ids for e in exs)
    flat = [i for e in exs for i in e.input_ids]
    assert flat == [tok.bos_token_id] + tok(long, add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_instruction_masks_the_prompt(tok):
    rec = {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}
    data = prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=[rec])
    ex = data.train.examples[0]
    prompt = DataConfig().prompt_template.format(instruction="Say hi", input="to Bob")
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    target_ids = tok("Hi Bob", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.input_ids == prompt_ids + target_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert ex.prompt_ids == prompt_ids and ex.reference == "Hi Bob"
    # no input -> the other template
    ex2 = prepare_data(DataConfig(eval_fraction=0), tok, causal,
                       train_source=[{"instruction": "Say hi", "output": "Hi"}]).train.examples[0]
    assert tok.decode(ex2.prompt_ids, skip_special_tokens=True).strip().endswith("### Response:")
    assert "Input" not in tok.decode(ex2.prompt_ids)


def test_seq2seq_masks_the_source_and_uses_the_separator(tok):
    data = prepare_data(DataConfig(eval_fraction=0, separator=" => ", columns={"source": "mr", "target": "ref"}),
                        tok, causal, train_source=[{"mr": "name[X]", "ref": "X is nice."}])
    ex = data.train.examples[0]
    n_prompt = len(ex.prompt_ids)
    assert ex.prompt_ids == [tok.bos_token_id] + tok("name[X] => ", add_special_tokens=False).input_ids
    assert all(x == IGNORE_INDEX for x in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id


def test_chat_without_template_trains_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye now"}]
    ex = prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=[{"messages": msgs}]).train.examples[0]
    trained = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])
    assert trained.replace(" ", "") == ("Hello\nByenow" + tok.eos_token).replace(" ", "")
    assert ex.reference == "Bye now"
    assert tok.decode(ex.prompt_ids, skip_special_tokens=True).rstrip().endswith("Assistant:")


def test_chat_with_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ex = prepare_data(DataConfig(eval_fraction=0), t, causal, train_source=[{"messages": msgs}]).train.examples[0]
    full = t.apply_chat_template(msgs, tokenize=False)
    assert t.decode(ex.input_ids).replace(" ", "") == full.replace(" ", "")
    trained = t.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])
    assert trained.replace(" ", "") == "Hello</s>"


def test_chat_errors(tok):
    with pytest.raises(DataError, match="no assistant message"):
        prepare_data(DataConfig(eval_fraction=0), tok, causal,
                     train_source=[{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="role"):
        prepare_data(DataConfig(eval_fraction=0), tok, causal,
                     train_source=[{"messages": [{"role": "robot", "content": "x"}]}])


def test_classification_labels(tok):
    recs = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "ok", "text_pair": "fine",
                                                                                 "label": "pos"}]
    data = prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=recs)
    assert data.format == "classification" and data.label_names == ["neg", "pos"]
    assert [e.labels for e in data.train.examples] == [1, 0, 1]
    ints = prepare_data(DataConfig(eval_fraction=0), tok, causal,
                        train_source=[{"sentence": "a", "label": "2"}, {"sentence": "b", "label": 0}])
    assert ints.label_names == ["0", "1", "2"] and [e.labels for e in ints.train.examples] == [2, 0]
    batch = collate(data.train.examples, tok.pad_token_id, "SEQ_CLS")
    assert batch["labels"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("records, match", [
    ([{"text": "a", "label": -1}, {"text": "b", "label": 0}], ">= 0"),
    ([{"text": "a", "label": 0.5}], "regression"),
    ([{"text": "a", "label": ""}], "empty label"),
    ([{"text": "a", "label": 0}, {"text": "b"}], "no 'label'"),
])
def test_bad_labels(tok, records, match):
    with pytest.raises(DataError, match=match):
        prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=records)


def test_eval_label_the_model_cannot_hold(tok):
    with pytest.raises(DataError, match="cannot hold"):
        prepare_data(DataConfig(), tok, causal, train_source=[{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                     eval_source=[{"text": "c", "label": "z"}])


def test_task_mismatch_is_an_error(tok):
    with pytest.raises(DataError, match="SEQ_CLS"):
        prepare_data(DataConfig(eval_fraction=0), tok, lambda f: "CAUSAL_LM",
                     train_source=[{"text": "a", "label": 0}])


def test_eval_split_is_held_out(tok):
    recs = [{"text": f"story number {i}"} for i in range(20)]
    data = prepare_data(DataConfig(eval_fraction=0.25), tok, causal, train_source=recs, seed=1)
    assert len(data.train) == 15 and len(data.eval) == 5
    train_texts = {tok.decode(e.input_ids, skip_special_tokens=True) for e in data.train.examples}
    eval_texts = {tok.decode(e.input_ids, skip_special_tokens=True) for e in data.eval.examples}
    assert not train_texts & eval_texts


def test_completion_cut_off_by_max_length_is_dropped(tok):
    recs = [{"source": "word " * 50, "target": "x"}, {"source": "a", "target": "b"}]
    data = prepare_data(DataConfig(eval_fraction=0, max_length=16), tok, causal, train_source=recs)
    assert len(data.train) == 1 and data.train.dropped == 1


def test_bundled_demo_data_loads(tok):
    data = prepare_data(DataConfig(), tok, causal)
    assert data.format == "seq2seq" and len(data.train) == 800 and len(data.eval) == 100


# -- loss masking and padding -------------------------------------------------------------------


def test_loss_ignores_prompt_and_padding(tok, lm):
    recs = [{"source": "name[A], food[Thai]", "target": "A serves Thai food."},
            {"source": "name[B]", "target": "B is a pub in the city centre near the river."}]
    data = prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=recs)
    batch = collate(data.train.examples, tok.pad_token_id, "CAUSAL_LM")
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]  # a row is padded
    with torch.no_grad():
        total, _ = loss_sum(lm, batch, "CAUSAL_LM")
        manual = 0.0
        for ex in data.train.examples:
            logits = lm(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            keep = labels != IGNORE_INDEX
            manual += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
    assert math.isclose(float(total), manual, rel_tol=1e-5)


# -- packing ------------------------------------------------------------------------------------


def test_pack_keeps_examples_whole_and_restarts_positions(tok):
    recs = [{"text": "one two three"}, {"text": "four five"}, {"text": "six seven eight nine ten"}]
    exs = prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=recs).train.examples
    lengths = [len(e.input_ids) for e in exs]
    rows = pack(exs, max_length=lengths[0] + lengths[1])
    assert len(rows) == 2
    assert rows[0].input_ids == exs[0].input_ids + exs[1].input_ids
    assert rows[0].position_ids == list(range(lengths[0])) + list(range(lengths[1]))
    assert rows[0].labels[lengths[0]] == IGNORE_INDEX  # never predict across the boundary
    batch = collate(rows, tok.pad_token_id, "CAUSAL_LM")
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_packing_has_no_cross_example_attention(tok, lm):
    assert check_packing(lm, 512) is None
    recs = [{"text": "Once upon a time there was a cat."}, {"text": "The dog ran to the park and played."}]
    exs = prepare_data(DataConfig(eval_fraction=0), tok, causal, train_source=recs).train.examples
    with torch.no_grad():
        separate = sum(float(loss_sum(lm, collate([e], tok.pad_token_id, "CAUSAL_LM"), "CAUSAL_LM")[0]) for e in exs)
        packed_rows = pack(exs, 1000)
        packed = float(loss_sum(lm, collate(packed_rows, tok.pad_token_id, "CAUSAL_LM"), "CAUSAL_LM")[0])
    # the targets are the same set: the first token of an example is never a target in either case
    assert math.isclose(packed, separate, rel_tol=1e-5)


def test_check_packing_detects_leakage():
    class Leaky(torch.nn.Module):
        """Mixes every position with the mean of the row: attention across packed examples."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 4)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            h = self.emb(input_ids)
            return type("Out", (), {"logits": h + h.mean(1, keepdim=True)})()

    assert "attend" in check_packing(Leaky(), 32)


# -- metrics ------------------------------------------------------------------------------------


def test_generation_metrics():
    assert exact_match("The cat.", "the cat") == 1.0
    assert exact_match("the cat sat", "the cat") == 0.0
    # LCS("a b c d", "a c d e") = 3 -> P = 3/4, R = 3/4
    assert math.isclose(rouge_l("a b c d", "a c d e"), 0.75)
    assert rouge_l("", "a") == 0.0
    assert math.isclose(rouge_l("the cat sat", "the cat"), 2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_classification_metrics():
    # binary: truth [1,1,0,0], pred [1,0,0,1] -> tp=1 fp=1 fn=1 -> F1 = 0.5
    sums = MetricSums(2)
    sums.add_classification(torch.tensor([1, 0, 0, 1]), torch.tensor([1, 1, 0, 0]))
    sums.loss_sum, sums.count = 2.0, 4
    out = sums.result("SEQ_CLS")
    assert out == {"eval_loss": 0.5, "eval_accuracy": 0.5, "eval_f1": 0.5}
    conf = torch.tensor([[2, 0, 0], [0, 1, 1], [0, 0, 0]])
    # per-class F1: 1.0, 2/3, 0 (class 2 predicted once, never true) -> macro over present classes
    assert math.isclose(f1_from_confusion(conf), (1.0 + 2 / 3 + 0.0) / 3)
    lm = MetricSums()
    lm.loss_sum, lm.count = 6.0, 3
    assert math.isclose(lm.result("CAUSAL_LM")["eval_perplexity"], math.exp(2.0))
