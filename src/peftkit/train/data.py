"""Data files and formats: reading records, detecting the format, turning records into token ids.

Files: ``.json`` (a list of objects, or an object holding one such list), ``.jsonl``, ``.csv``,
``.tsv``, ``.txt`` (documents separated by ``<|endoftext|>``, else by blank lines, else one per line),
a folder written by ``datasets.save_to_disk``, or in Python a ``datasets.Dataset`` / a list of dicts.

Formats (the fields each needs; ``columns`` maps a field to another column name):

=============== ================================== ==========================================
format          fields                             loss on
=============== ================================== ==========================================
text            text                               every token (long texts cut into windows)
instruction     instruction, input (opt.), output  the output only (prompt tokens masked)
chat            messages ([{role, content}, ...])  the assistant turns only
classification  text, text_pair (opt.), label      the label (a sequence-classification head)
seq2seq         source, target                     the target only
=============== ================================== ==========================================

On a decoder-only model an example is ``[bos] prompt completion [eos]`` with ``labels = -100`` on
the prompt; on an encoder-decoder model the prompt is the encoder input and the completion the
labels. The prompt and the completion are tokenized separately, exactly as the prompt is tokenized
again for generation, so training and inference see the same tokens.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import PeftkitError
from .config import FORMATS, DataConfig

IGNORE_INDEX = -100

# a format's fields: required, optional, and column names accepted for them when not mapped
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "classification": (("text", "label"), ("text_pair",)),
    "seq2seq": (("source", "target"), ()),
}
ALIASES: dict[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "sentence1", "content"),
    "text_pair": ("text_pair", "sentence2"),
    "label": ("label", "labels"),
    "messages": ("messages", "conversations", "conversation"),
    "source": ("source", "prompt", "input", "src"),
    "target": ("target", "completion", "output", "tgt"),
}


def plain_turn(role: str, content: Optional[str] = None) -> str:
    """Plain chat format (no chat template; train and serve): ``Role: content`` + newline per message;
    with no ``content``, the head that starts the reply (``Assistant: ``)."""
    head = f"{role.capitalize()}: "
    return head if content is None else head + content + "\n"


class DataError(PeftkitError):
    """A data file is missing, empty, unreadable, or lacks the columns its format needs."""


# ---------------------------------------------------------------------------------------------
# reading records


def bundled_data(name: str = "e2e_nlg") -> tuple[str, str]:
    """(train, eval) files of the bundled demo data (E2E NLG, CC BY-SA 4.0, see its LICENSE file)."""
    from ..assets import ASSETS_DIR

    folder = ASSETS_DIR / "data"
    return str(folder / f"{name}_train.jsonl"), str(folder / f"{name}_eval.jsonl")


def read_records(source: Any) -> list[dict[str, Any]]:
    """Records (dicts) from a file path, a ``datasets`` object, or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        return _read_path(os.fspath(source))
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        records = list(source)
        if records and not all(isinstance(r, dict) for r in records):
            raise DataError("A list of records must hold dicts (one per example).")
        if not records:
            raise DataError("The list of records is empty.")
        return records
    to_list = getattr(source, "to_list", None)
    if callable(to_list):  # datasets.Dataset
        records = to_list()
        if not records:
            raise DataError("The dataset is empty.")
        return records
    if hasattr(source, "keys") and hasattr(source, "__getitem__"):  # datasets.DatasetDict
        raise DataError(f"Got a dataset with splits {list(source.keys())}; pass one split, e.g. ds['train'].")
    raise DataError(f"Cannot read data from a {type(source).__name__}; pass a file path, a datasets.Dataset or a list of dicts.")


def _read_path(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        raise DataError(f"Data file {path} does not exist.")
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    ext = os.path.splitext(path)[1].lower()
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_delimited, ".tsv": _read_delimited,
               ".txt": _read_text, ".text": _read_text}
    if ext not in readers:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'}; use .json, .jsonl, .csv, .tsv or .txt.")
    try:
        records = readers[ext](path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}).") from None
    except csv.Error as exc:
        raise DataError(f"{path} cannot be read as {ext[1:].upper()} ({exc}).") from None
    if not records:
        raise DataError(f"{path} holds no records (the file is empty).")
    return records


def _read_saved_dataset(path: str) -> list[dict[str, Any]]:
    if not (os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))):
        raise DataError(f"{path} is a folder but not one written by datasets.save_to_disk; pass a file.")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved dataset; reading it needs `pip install datasets`.") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return read_records(ds)


def _read_json(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines in a .json file
            return _parse_jsonl(text.splitlines(), path)
        raise DataError(f"{path} is not valid JSON: {exc}.") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records, or an object with exactly one list of records.")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got a {type(data).__name__}.")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object.")
    return data


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig") as fh:
        return _parse_jsonl(fh.read().splitlines(), path)


def _parse_jsonl(lines: list[str], path: str) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {n}: not valid JSON ({exc.msg}).") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}.")
        out.append(rec)
    return out


def _read_delimited(path: str) -> list[dict[str, Any]]:
    """A header line, then one record per row; blank lines skipped, short rows padded with None.
    ``.csv``: comma separated with RFC 4180 quoting (a quoted field may hold commas and newlines).
    ``.tsv``: as GLUE and ``pandas.read_csv(sep="\\t", quoting=csv.QUOTE_NONE)`` read it: one record per
    line, fields split at tabs, quotes ordinary characters (``"the witness"`` stays as written)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        tsv = path.lower().endswith(".tsv")
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(fh)
        header, rows = None, []
        for row in reader:
            if not row:
                continue
            if header is None:
                header = row
            elif len(row) > len(header):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} fields, more than the header's "
                                f"{len(header)}; check the separator (and, in a .csv, the quoting).")
            else:
                rows.append({name: (row[i] if i < len(row) else None) for i, name in enumerate(header)})
    return rows


def _read_text(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    if "<|endoftext|>" in text:
        docs = text.split("<|endoftext|>")
    elif "\n\n" in text.strip():
        docs = text.split("\n\n")
    else:
        docs = text.splitlines()
    return [{"text": d.strip()} for d in docs if d.strip()]


# ---------------------------------------------------------------------------------------------
# formats


def detect_format(columns: Sequence[str], mapping: Optional[dict[str, str]] = None) -> str:
    """The format whose fields the columns have (explicit ``mapping`` first, then known names)."""
    cols = set(columns)
    mapped = set((mapping or {}).keys())

    def has(f: str) -> bool:
        return f in mapped or any(a in cols for a in ALIASES.get(f, (f,)))

    if has("messages"):
        return "chat"
    if "instruction" in cols or "instruction" in mapped:
        return "instruction"
    if has("label") and has("text"):
        return "classification"
    if has("source") and has("target"):
        return "seq2seq"
    if has("text"):
        return "text"
    raise DataError(
        f"Cannot tell the data format from the columns {sorted(cols)}. Pass --format ({', '.join(FORMATS)}) "
        "and map your columns with --columns, e.g. --columns source=mr,target=ref."
    )


def resolve_columns(fmt: str, columns: Sequence[str], mapping: Optional[dict[str, str]], source: str) -> dict[str, str]:
    """field -> column for ``fmt``; DataError naming what is missing and what the file has."""
    if fmt not in FIELDS:
        raise DataError(f"Unknown data format {fmt!r}; use one of {', '.join(FORMATS)}.")
    required, optional = FIELDS[fmt]
    mapping = dict(mapping or {})
    bad = sorted(set(mapping) - set(required) - set(optional))
    if bad:
        raise DataError(f"--columns maps {bad}, which the {fmt} format does not have; its fields: "
                        f"{', '.join(required + optional)}.")
    cols = list(columns)
    out: dict[str, str] = {}
    for f in required + optional:
        if f in mapping:
            if mapping[f] not in cols:
                raise DataError(f"{source}: column {mapping[f]!r} (mapped to {f}) is not in the data; columns: {cols}.")
            out[f] = mapping[f]
            continue
        taken = set(out.values())
        found = [a for a in ALIASES.get(f, (f,)) if a in cols and a not in taken and a not in mapping.values()]
        if fmt == "instruction" and f == "input":
            found = ["input"] if "input" in cols else []
        if found:
            out[f] = found[0]
        elif f in required:
            raise DataError(
                f"{source}: the {fmt} format needs a {f!r} column (or one of {list(ALIASES.get(f, (f,)))}); the "
                f"data has columns {cols}. Map yours with --columns {f}=<column>."
            )
    return out


# ---------------------------------------------------------------------------------------------
# tokenized examples


@dataclass
class Example:
    """One tokenized example. ``labels`` is per token (LMs) or one class id (classification)."""

    input_ids: list[int]
    labels: Any
    token_type_ids: Optional[list[int]] = None
    prompt_ids: Optional[list[int]] = None  # generation prompt (generation tasks)
    reference: Optional[str] = None  # the expected completion (generation tasks)


@dataclass
class Dataset:
    """Tokenized examples of one split, with what collation and metrics need to know."""

    examples: list[Example]
    format: str
    task_type: str
    label_names: Optional[list[str]] = None
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_generation(self) -> bool:
        return self.format in ("instruction", "chat", "seq2seq")


class Encoder:
    """Turns records of one format into :class:`Example` s for a tokenizer and task type."""

    def __init__(self, tokenizer: Any, task_type: str, config: DataConfig, fmt: str,
                 label_names: Optional[list[str]] = None) -> None:
        self.tok = tokenizer
        self.task_type = task_type
        self.config = config
        self.format = fmt
        self.label_names = label_names
        self.decoder_only = task_type == "CAUSAL_LM"
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if fmt == "text" and task_type == "SEQ_2_SEQ_LM":
            raise DataError("The text format trains a decoder-only model; an encoder-decoder model needs seq2seq, "
                            "instruction or chat data.")
        if fmt == "classification" and task_type != "SEQ_CLS":
            raise DataError(f"Classification data needs task SEQ_CLS, not {task_type}.")
        if fmt != "classification" and task_type == "SEQ_CLS":
            raise DataError(f"Task SEQ_CLS needs classification data (text, label), not {fmt}.")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    # prompt/completion texts of a record ----------------------------------------------------
    def prompt_completion(self, rec: dict[str, Any], cols: dict[str, str]) -> tuple[list[tuple[str, bool]], Optional[str]]:
        """Segments (text, in loss) and the reference completion of a generation record."""
        fmt = self.format
        if fmt == "instruction":
            instruction = _text(rec, cols["instruction"])
            inp = _text(rec, cols["input"]) if "input" in cols else ""
            template = self.config.prompt_template if inp else self.config.prompt_template_no_input
            prompt = template.format(instruction=instruction, input=inp)
            target = _text(rec, cols["output"])
            return [(prompt, False), (target, True)], target
        if fmt == "seq2seq":
            source, target = _text(rec, cols["source"]), _text(rec, cols["target"])
            sep = self.config.separator if self.decoder_only else ""
            return [(source + sep, False), (target, True)], target
        if fmt == "chat":
            return self._chat_segments(rec[cols["messages"]])
        raise AssertionError(fmt)

    def _chat_segments(self, messages: Any) -> tuple[list[tuple[str, bool]], Optional[str]]:
        msgs = _check_messages(messages)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        template = getattr(self.tok, "chat_template", None)
        segments: list[tuple[str, bool]] = []
        if template:
            done = ""
            for i, m in enumerate(msgs[: last + 1]):
                if m["role"] == "assistant":
                    before = self.tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                    upto = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                    if not (before.startswith(done) and upto.startswith(before)):
                        raise DataError("The tokenizer's chat template does not render conversations as growing "
                                        "prefixes; the chat format cannot mask its prompts.")
                    segments.append((before[len(done):], False))
                    segments.append((upto[len(before):], True))
                    done = upto
            return segments, msgs[last]["content"]
        for m in msgs[: last + 1]:
            if m["role"] == "assistant":
                segments.append((plain_turn("assistant"), False))
                segments.append((m["content"] + "\n", True))
            else:
                segments.append((plain_turn(m["role"], m["content"]), False))
        # the completion's trailing newline is replaced by eos below
        text, _ = segments[-1]
        segments[-1] = (text[:-1], True)
        return segments, msgs[last]["content"]

    # encoding ---------------------------------------------------------------------------------
    def encode(self, rec: dict[str, Any], cols: dict[str, str]) -> list[Example]:
        L = self.config.max_length
        if self.format == "text":
            ids = self.bos + self._ids(_text(rec, cols["text"])) + self.eos
            return [Example(input_ids=ids[i:i + L], labels=list(ids[i:i + L])) for i in range(0, len(ids), L)
                    if len(ids[i:i + L]) > 1]
        if self.format == "classification":
            text = _text(rec, cols["text"])
            pair = _text(rec, cols["text_pair"]) if "text_pair" in cols else None
            enc = self.tok(text, pair, truncation=True, max_length=L)
            return [Example(input_ids=list(enc["input_ids"]), labels=self.label_id(rec[cols["label"]]),
                            token_type_ids=list(enc["token_type_ids"]) if "token_type_ids" in enc else None)]
        segments, reference = self.prompt_completion(rec, cols)
        if self.format == "chat" and getattr(self.tok, "chat_template", None):
            prefix: list[int] = []  # the template writes its own bos and end-of-turn tokens
            eos: list[int] = []
        else:
            prefix, eos = list(self.bos), self.eos
        if not self.decoder_only:
            prompt = "".join(t for t, train in segments if not train)
            target = "".join(t for t, train in segments if train)
            src = self.tok(prompt, truncation=True, max_length=L).input_ids
            tgt = self.tok(text_target=target, truncation=True, max_length=L).input_ids
            return [Example(input_ids=src, labels=tgt, prompt_ids=src, reference=reference)]
        ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        prompt_ids: Optional[list[int]] = None
        for i, (text, train) in enumerate(segments):
            piece = self._ids(text)
            if train and i == len(segments) - 1:
                piece = piece + eos
                prompt_ids = list(ids)
            ids += piece
            labels += piece if train else [IGNORE_INDEX] * len(piece)
        return [Example(input_ids=ids[:L], labels=labels[:L], prompt_ids=prompt_ids, reference=reference)]

    def label_id(self, value: Any) -> int:
        names = self.label_names or []
        key = _label_key(value)
        if key not in names:
            raise DataError(f"Label {value!r} is not among the training labels {names}; the model cannot hold it.")
        return names.index(key)


def _text(rec: dict[str, Any], col: str) -> str:
    value = rec.get(col)
    if value is None:
        return ""
    if not isinstance(value, str):
        return str(value)
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError("A chat record's messages must be a list of {role, content} objects.") from None
    if not isinstance(messages, list) or not messages:
        raise DataError("A chat record's messages must be a non-empty list of {role, content} objects.")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"Chat message {m!r} needs 'role' and 'content'.")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"Chat role {m['role']!r} is not one of system, user, assistant.")
        out.append({"role": m["role"], "content": str(m["content"])})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError("A chat record has no assistant message: there is nothing to train on.")
    return out


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"Label {value!r} is not a class (regression labels are not supported).")
        return str(int(value))
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError("A record has an empty label.")
    return str(value).strip()


def label_names_for(records: list[dict[str, Any]], column: str, source: str) -> list[str]:
    """Sorted class names; integer labels 0..n-1 keep their number as their id."""
    keys = []
    for i, rec in enumerate(records):
        if column not in rec:
            raise DataError(f"{source}: record {i} has no {column!r} column.")
        try:
            keys.append(_label_key(rec[column]))
        except DataError as exc:
            raise DataError(f"{source}: record {i}: {exc}") from None
    unique = sorted(set(keys))
    if all(k.lstrip("-").isdigit() for k in unique):
        ints = sorted(int(k) for k in unique)
        if ints[0] < 0:
            raise DataError(f"{source}: class labels must be >= 0, found {ints[0]}.")
        return [str(i) for i in range(ints[-1] + 1)]
    return unique


def encode_records(records: list[dict[str, Any]], encoder: Encoder, cols: dict[str, str], source: str) -> Dataset:
    examples: list[Example] = []
    dropped = 0
    for i, rec in enumerate(records):
        missing = [c for f, c in cols.items() if f in FIELDS[encoder.format][0] and c not in rec]
        if missing:
            raise DataError(f"{source}: record {i} has no column {missing[0]!r}.")
        try:
            exs = encoder.encode(rec, cols)
        except DataError as exc:
            raise DataError(f"{source}: record {i}: {exc}") from None
        for ex in exs:
            if isinstance(ex.labels, list) and encoder.decoder_only:
                if all(x == IGNORE_INDEX for x in ex.labels[1:]):
                    dropped += 1  # truncation cut the whole completion off
                    continue
            examples.append(ex)
    if not examples:
        raise DataError(f"{source}: no usable example (every completion was cut off by max_length "
                        f"{encoder.config.max_length}?).")
    return Dataset(examples=examples, format=encoder.format, task_type=encoder.task_type,
                   label_names=encoder.label_names, dropped=dropped)


@dataclass
class LoadedData:
    train: Optional[Dataset]
    eval: Optional[Dataset]
    format: str
    columns: dict[str, str]
    label_names: Optional[list[str]]
    task_type: str


def prepare_data(config: DataConfig, tokenizer: Any, task_type_for: Any, train_source: Any = None,
                 eval_source: Any = None, need_train: bool = True, seed: int = 0,
                 label_names: Optional[list[str]] = None) -> LoadedData:
    """Read, check and tokenize the train and eval data of a run.

    ``task_type_for(format) -> task type`` picks the task from the detected format; ``label_names``
    fixes the classes (evaluating a trained classifier), else they come from the training data.
    """
    import random

    train_src = train_source if train_source is not None else config.data
    eval_src = eval_source if eval_source is not None else config.eval_data
    if train_src is None and need_train:
        train_src, default_eval = bundled_data()
        if eval_src is None:
            eval_src = default_eval
    train_records = read_records(train_src) if train_src is not None else None
    eval_records = read_records(eval_src) if eval_src is not None else None
    first = train_records if train_records is not None else eval_records
    if first is None:
        raise DataError("No data given: pass --data (and/or --eval-data).")
    def describe(src: Any) -> str:
        return os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__} of records>"

    name = describe(train_src if train_records is not None else eval_src)
    columns = list(first[0].keys())
    fmt = config.format or detect_format(columns, config.columns)
    cols = resolve_columns(fmt, columns, config.columns, name)
    if train_records is not None and eval_records is None and config.eval_fraction > 0:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(round(len(order) * config.eval_fraction)))
        if len(order) - n_eval < 1:
            raise DataError(f"{name} has {len(order)} records: too few to hold out eval_fraction for evaluation.")
        eval_records = [train_records[i] for i in sorted(order[:n_eval])]
        train_records = [train_records[i] for i in sorted(order[n_eval:])]
    if eval_records is not None:
        eval_name = describe(eval_src) if eval_src is not None else name
        eval_cols = resolve_columns(fmt, list(eval_records[0].keys()), config.columns, eval_name)
        if eval_cols != cols:
            raise DataError(f"The eval data's columns {eval_cols} differ from the training data's {cols}.")
        if config.max_eval_samples is not None:
            eval_records = eval_records[: config.max_eval_samples]
    task_type = task_type_for(fmt)
    if fmt == "classification" and label_names is None:
        label_names = label_names_for(train_records if train_records is not None else eval_records, cols["label"], name)
    encoder = Encoder(tokenizer, task_type, config, fmt, label_names)
    train = encode_records(train_records, encoder, cols, name) if train_records is not None else None
    ev = encode_records(eval_records, encoder, cols, eval_name) if eval_records is not None else None
    return LoadedData(train=train, eval=ev, format=fmt, columns=cols, label_names=label_names, task_type=task_type)


def format_prompt(text: str, fmt: Optional[str], tokenizer: Any, config: DataConfig, task_type: str) -> list[int]:
    """Token ids of a generation prompt written as the training data's prompts were."""
    enc = Encoder(tokenizer, task_type, config, fmt or "text")
    if fmt == "seq2seq":
        rec, cols = {"source": text, "target": ""}, {"source": "source", "target": "target"}
    elif fmt == "instruction":
        rec, cols = {"instruction": text, "output": ""}, {"instruction": "instruction", "output": "output"}
    elif fmt == "chat":
        rec = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
        cols = {"messages": "messages"}
    else:
        return enc.bos + enc._ids(text) if task_type == "CAUSAL_LM" else tokenizer(text).input_ids
    ex = enc.encode(rec, cols)[0]
    return ex.prompt_ids


__all__ = [
    "DataError",
    "Dataset",
    "Encoder",
    "Example",
    "IGNORE_INDEX",
    "bundled_data",
    "detect_format",
    "format_prompt",
    "plain_turn", "prepare_data",
    "read_records",
    "resolve_columns",
]
