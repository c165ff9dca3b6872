"""Seeded random mutations of real adapter folders: loading one gives a PeftkitError or succeeds,
never another exception, and a failed load leaves the model exactly as it was.

Folders are saved by peftkit for several methods (LoRA, DoRA, IA3, bottleneck, prompt tuning,
prefix tuning with an encoder file) on tiny models; each case mutates one of them: the safetensors
file (truncated, bytes flipped, its JSON header edited: dtypes, shapes, offsets, keys), the
adapter_config.json (fields removed, retyped or set to odd values: NaN, huge numbers, deep nesting,
wrong peft_type), or the folder (files missing or replaced by folders). The seeds are fixed, so a
failure names a case that reproduces.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
import warnings

import pytest
import torch

from peftkit import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftkitError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.core import AdapterLayer

from .models import MLP, randomize_adapters, tiny_llama

CASES_PER_SOURCE = 40

SOURCES = {
    "lora_mlp": (MLP, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], modules_to_save=["lin2"])),
    "dora_llama": (tiny_llama, lambda: LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM")),
    "ia3_llama": (tiny_llama, lambda: IA3Config(task_type="CAUSAL_LM")),
    "bottleneck_llama": (tiny_llama, lambda: BottleneckConfig(style="pfeiffer", bottleneck_size=4, task_type="CAUSAL_LM")),
    "prompt_llama": (tiny_llama, lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "prefix_llama": (tiny_llama, lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                            task_type="CAUSAL_LM")),
}

_FOLDERS: dict[str, str] = {}


def _source(name: str, root) -> str:
    """The saved folder of source ``name`` (made once per session)."""
    if name not in _FOLDERS:
        build, config = SOURCES[name]
        torch.manual_seed(0)
        pm = get_peft_model(build(), config())
        randomize_adapters(pm, is_adapter=lambda n: any(k in n for k in ("lora_", "ia3_", "adapter_", "prompt_")))
        folder = root / name
        pm.save_pretrained(folder)
        _FOLDERS[name] = str(folder)
    return _FOLDERS[name]


# -- mutations of the safetensors file ------------------------------------------------------------

def _read_st(path: str) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_st(path: str, header: dict, body: bytes, pad: bool = True) -> None:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + body)


def _mutate_weights(rng: random.Random, path: str) -> str:
    header, body = _read_st(path)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    kind = rng.choice(["truncate", "flip", "dtype", "shape", "offsets", "rename", "drop", "header_len", "nan",
                       "extra_key", "garbage"])
    if kind == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: rng.randrange(0, len(data))])
    elif kind == "flip":
        data = bytearray(open(path, "rb").read())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        open(path, "wb").write(bytes(data))
    elif kind == "dtype":
        header[key]["dtype"] = rng.choice(["I64", "U8", "BOOL", "F16", "F64", "X9"])
        _write_st(path, header, body)
    elif kind == "shape":
        shape = header[key]["shape"]
        header[key]["shape"] = rng.choice([[], [0], list(reversed(shape)), shape + [1], [s + 1 for s in shape],
                                           [-1], [2 ** 40]])
        _write_st(path, header, body)
    elif kind == "offsets":
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[end, start], [start, end + 4], [start + 4, end + 4], [0, 2 ** 62],
                                                  [start, start]])
        _write_st(path, header, body)
    elif kind == "rename":
        header[key + ".x" if rng.random() < 0.5 else "base_model.model.nope.weight"] = header.pop(key)
        _write_st(path, header, body)
    elif kind == "drop":
        del header[key]
        _write_st(path, header, body)
    elif kind == "header_len":
        data = open(path, "rb").read()
        open(path, "wb").write(struct.pack("<Q", rng.choice([0, 1, 2 ** 63, len(data) * 2])) + data[8:])
    elif kind == "nan":  # valid file, non-finite values: loads (a NaN adapter is the user's), must not crash
        start, end = header[key]["data_offsets"]
        if header[key]["dtype"] == "F32" and end > start:
            body = body[:start] + struct.pack("<f", float("nan")) * ((end - start) // 4) + body[end:]
        _write_st(path, header, body)
    elif kind == "extra_key":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 1}, "x", None])
        _write_st(path, header, body)
    else:
        open(path, "wb").write(os.urandom(rng.randrange(0, 64)))
    return f"weights:{kind}:{key}"


# -- mutations of adapter_config.json -------------------------------------------------------------

_ODD = [None, 0, -1, 1.5, float("nan"), float("inf"), 2 ** 40, "", "x", [], {}, [1, "a"], {"a": {"b": []}}, True,
        "LORA", "CAUSAL_LM", "[", "(?P<", "../..", "/etc/passwd"]


def _mutate_config(rng: random.Random, path: str) -> str:
    text = open(path, encoding="utf-8").read()
    data = json.loads(text)
    key = rng.choice(sorted(data))
    kind = rng.choice(["drop", "retype", "peft_type", "task_type", "unknown", "deep", "not_json", "list", "binary"])
    if kind == "drop":
        del data[key]
    elif kind == "retype":
        data[key] = rng.choice(_ODD)
    elif kind == "peft_type":
        data["peft_type"] = rng.choice(["LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK", "NOPE", 3, None])
    elif kind == "task_type":
        data["task_type"] = rng.choice(["SEQ_CLS", "SEQ_2_SEQ_LM", "NOPE", None, 7])
    elif kind == "unknown":
        data["some_future_field"] = rng.choice(_ODD)
    elif kind == "deep":
        depth = rng.choice([50, 10_000, 100_000])
        open(path, "w").write("[" * depth + "]" * depth)
        return f"config:deep:{depth}"
    elif kind == "not_json":
        open(path, "w").write(text[: rng.randrange(len(text))])
        return "config:truncated"
    elif kind == "list":
        open(path, "w").write(json.dumps([data]))
        return "config:list"
    else:
        open(path, "wb").write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        return "config:binary"
    with open(path, "w", encoding="utf-8") as fh:  # json writes NaN / Infinity, which json.load accepts
        json.dump(data, fh)
    return f"config:{kind}:{key}"


def _mutate_folder(rng: random.Random, folder: str) -> str:
    name = rng.choice(sorted(os.listdir(folder)))
    path = os.path.join(folder, name)
    if rng.random() < 0.5:
        os.remove(path)
        return f"folder:missing:{name}"
    os.remove(path)
    os.mkdir(path)
    return f"folder:dir_instead:{name}"


def _mutate(rng: random.Random, folder: str) -> str:
    roll = rng.random()
    if roll < 0.45:
        return _mutate_weights(rng, os.path.join(folder, "adapter_model.safetensors"))
    if roll < 0.85:
        return _mutate_config(rng, os.path.join(folder, "adapter_config.json"))
    extra = os.path.join(folder, "peftkit_prompt_encoder.safetensors")
    if os.path.exists(extra) and rng.random() < 0.5:
        return "encoder_file:" + _mutate_weights(rng, extra)
    return _mutate_folder(rng, folder)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_mutated_folders_load_or_fail_cleanly(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources", numbered=True)
    original = _source(source, root)
    build = SOURCES[source][0]
    torch.manual_seed(1)
    base = build()
    before = _snapshot(base)
    failures = []
    for seed in range(CASES_PER_SOURCE):
        rng = random.Random(f"{source}-{seed}")
        folder = str(tmp_path_factory.mktemp("case"))
        shutil.rmtree(folder)
        shutil.copytree(original, folder)
        what = _mutate(rng, folder)
        model = copy.deepcopy(base)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PeftModel.from_pretrained(model, folder, is_trainable=rng.random() < 0.5)
        except PeftkitError:
            after = _snapshot(model)
            if any(isinstance(m, AdapterLayer) for m in model.modules()) or after.keys() != before.keys() or not all(
                    torch.equal(after[k], before[k]) for k in before):
                failures.append(f"seed {seed} ({what}): PeftkitError but the model changed")
        except RecursionError as exc:
            failures.append(f"seed {seed} ({what}): RecursionError {exc}")
        except Exception as exc:  # anything but PeftkitError breaks the promise
            failures.append(f"seed {seed} ({what}): {type(exc).__name__}: {str(exc)[:160]}")
        shutil.rmtree(folder, ignore_errors=True)
    assert not failures, "\n".join(failures)


def test_the_mutations_are_not_all_harmless(tmp_path):
    """A sanity check of the fuzzer itself: most mutations of a LoRA folder make loading fail."""
    original = _source("lora_mlp", tmp_path)
    failed = 0
    for seed in range(CASES_PER_SOURCE):
        folder = tmp_path / f"c{seed}"
        shutil.copytree(original, folder)
        _mutate(random.Random(f"lora_mlp-{seed}"), str(folder))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PeftModel.from_pretrained(MLP(), str(folder))
        except PeftkitError:
            failed += 1
        except Exception:  # counted by the other test
            failed += 1
    assert failed >= CASES_PER_SOURCE // 3


def test_random_config_fields_give_a_config_or_a_config_error():
    """Every registered method's config from a dict with random odd values for its fields: a config
    (valid values) or a PeftkitError, never another exception."""
    import dataclasses

    from peftkit import PeftConfig
    from peftkit.registry import all_methods

    failures = []
    for peft_type, method in sorted(all_methods().items()):
        names = [f.name for f in dataclasses.fields(method.config_cls) if f.name != "peft_type"]
        for seed in range(60):
            rng = random.Random(f"{peft_type}-{seed}")
            data = {"peft_type": peft_type, "task_type": "CAUSAL_LM"}
            for name in rng.sample(names, k=min(len(names), rng.randint(1, 4))):
                data[name] = rng.choice(_ODD)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    PeftConfig.from_dict(data)
            except PeftkitError:
                pass
            except Exception as exc:
                failures.append(f"{peft_type} {data}: {type(exc).__name__}: {str(exc)[:120]}")
    assert not failures, "\n".join(failures[:20])
