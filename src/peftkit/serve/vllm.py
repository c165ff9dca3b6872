"""Handing LoRA adapters to vLLM: check each adapter against the base model, then build vLLM's command.

vLLM (``python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules name=path ...``)
serves LoRA adapters in the Hugging Face PEFT folder format, which peftkit writes, and its greedy
outputs equal peftkit's. It rejects some config features and unknown module names, but it never
compares an adapter's shapes with the base model: an adapter made for another model of the same
architecture loads and generates garbage. :func:`check_vllm_adapter` checks what vLLM would need,
reading only ``config.json``, ``adapter_config.json`` and safetensors headers (never a weight).

What vLLM cannot serve (each a :class:`~peftkit.errors.CheckpointError` here, naming it):

* any method but LoRA: IA3, prompt tuning, prefix tuning, P-tuning, bottleneck adapters, BitFit,
  LayerNorm tuning, AdaLoRA, ... (peftkit's own server serves those);
* LoRA variants: DoRA, LoRA bias (``lora_bias``), ``bias != "none"``, ``modules_to_save`` (whole
  trained copies of modules), trainable tokens, inits that rewrite the base (PiSSA, OLoRA, CorDA,
  LoftQ), aLoRA, layer replication, QALoRA, BD-LoRA, ``target_parameters``;
* LoRA on anything but a 2-D linear weight, the input embedding (``embed_tokens``) or the output
  head (``lm_head``): convolutions, position embeddings, ...;
* base-model weights inside the adapter file (saved embedding layers): vLLM silently ignores them;
* a rank above ``--max-lora-rank`` (vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 or 512).

The shapes checked, for a module whose base weight is ``W`` (``out x in``; transformers' ``Conv1D``
with ``fan_in_fan_out`` stores ``in x out``) and rank ``r`` (``rank_pattern`` applied as PEFT does):
``lora_A: r x in``, ``lora_B: out x r``; for an embedding ``E`` (``vocab x dim``):
``lora_embedding_A: r x vocab``, ``lora_embedding_B: dim x r``. A tied ``lm_head`` is the input
embedding's weight.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TextIO

from ..errors import CheckpointError, ConfigError, closest

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_EMBEDDING_TARGETS = ("embed_tokens", "lm_head")
# init_lora_weights values that only set initial adapter weights (vLLM accepts them); True/False too
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# adapter_config.json fields whose truthy value vLLM cannot serve, and what each is
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias (lora_bias=true)",
    "modules_to_save": "modules_to_save (whole trained copies of modules)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_qalora": "QALoRA (use_qalora=true)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
}
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+\.(?:embed_tokens|lm_head))\.base_layer\.weight$")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$"
                  r"|^(?:base_model\.model\.)?(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


def _fail(adapter_path: str, what: str, todo: str) -> CheckpointError:
    return CheckpointError(f"vLLM cannot serve the adapter at {adapter_path}: {what}. {todo}")


def read_json(path: str, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; CheckpointError naming ``what`` when it is missing or corrupt."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{what}: {path} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} holds a JSON {type(data).__name__}, not an object.")
    return data


def safetensors_shapes(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor of a safetensors file, from its header only
    (``safe_open(...).get_slice(key).get_shape()``: no tensor data is read). A missing, truncated or
    corrupt file is a CheckpointError."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} does not exist.")
    try:
        with safe_open(path, framework="pt") as fh:
            return {key: tuple(int(d) for d in fh.get_slice(key).get_shape()) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception) for bad files
        raise CheckpointError(f"{what}: {path} is truncated or corrupt ({exc}); save it again.") from None


def base_weight_shapes(base_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The base model's ``config.json`` and ``{weight name: shape}`` from its safetensors headers
    (``model.safetensors``, or the shards listed by ``model.safetensors.index.json``)."""
    base_path = os.fspath(base_path)
    if not os.path.isdir(base_path):
        raise CheckpointError(f"The base model folder {base_path} does not exist (vLLM needs a local folder; "
                              "download a Hub model first).")
    config = read_json(os.path.join(base_path, "config.json"), "base model config")
    single = os.path.join(base_path, "model.safetensors")
    index = os.path.join(base_path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = read_json(index, "base model shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"base model shard index: {index} has no weight_map.")
        files = [os.path.join(base_path, f) for f in sorted(set(map(str, weight_map.values())))]
    else:
        raise CheckpointError(f"The base model folder {base_path} has no model.safetensors (nor a shard index); "
                              "save it with save_pretrained(safe_serialization=True).")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file, "base model weights"))
    return config, shapes


def adapter_tensor_shapes(adapter_path: str) -> dict[str, tuple[int, ...]]:
    """``{file key: shape}`` of an adapter's tensors (``adapter_model.safetensors``, else a legacy
    ``adapter_model.bin`` read with ``weights_only=True``)."""
    st = os.path.join(adapter_path, "adapter_model.safetensors")
    if os.path.isfile(st):
        return safetensors_shapes(st, "adapter weights")
    legacy = os.path.join(adapter_path, "adapter_model.bin")
    if os.path.isfile(legacy):
        from .._io import load_tensors

        return {k: tuple(v.shape) for k, v in load_tensors(legacy).items()}
    raise CheckpointError(f"adapter weights: {adapter_path} has neither adapter_model.safetensors nor "
                          "adapter_model.bin.")


def check_config(config: dict[str, Any], adapter_path: str, max_rank: Optional[int]) -> dict[str, int]:
    """The config checks: LoRA, no feature vLLM lacks, ranks within ``max_rank``. Returns
    ``rank_pattern`` as ``{pattern: rank}``."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        kind = peft_type or "no peft_type"
        raise _fail(adapter_path, f"it is a {kind} adapter, and vLLM serves LoRA adapters only",
                    "Serve it with peftkit serve (every method), or train a LoRA adapter for vLLM.")
    for field, what in UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise _fail(adapter_path, f"it uses {what}, which vLLM does not support",
                        "Serve it with peftkit serve, or retrain without it.")
    if str(config.get("bias", "none")) != "none":
        raise _fail(adapter_path, f"it trains biases (bias={config.get('bias')!r}), which vLLM does not load",
                    "Serve it with peftkit serve, or retrain with bias='none'.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        raise _fail(adapter_path, f"init_lora_weights={init!r} changes the base model's weights when loaded",
                    "Serve it with peftkit serve on the same base, or merge it into the base first.")
    r = config.get("r")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(pattern, dict):
        raise CheckpointError(f"adapter config: {adapter_path}/adapter_config.json has r={r!r}, rank_pattern="
                              f"{pattern!r}; r must be a positive integer and rank_pattern a mapping.")
    if not isinstance(config.get("lora_alpha"), (int, float)) or isinstance(config.get("lora_alpha"), bool):
        raise CheckpointError(f"adapter config: {adapter_path}/adapter_config.json has no numeric lora_alpha.")
    top = max([r, *pattern.values()])
    limit = VLLM_MAX_LORA_RANKS[-1] if max_rank is None else max_rank
    if top > limit:
        fit = [v for v in VLLM_MAX_LORA_RANKS if v >= top]
        todo = (f"Start vLLM with --max-lora-rank {fit[0]} or more." if fit else
                f"vLLM's largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}; retrain with a smaller r.")
        raise _fail(adapter_path, f"its rank {top} is above the maximum rank {limit}", todo)
    return pattern


def rank_of(module: str, r: int, pattern: Mapping[str, int]) -> int:
    """The rank PEFT gives ``module``: the first ``rank_pattern`` key that is a dotted suffix of it."""
    for key, rank in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return int(rank)
    return r


def lora_pairs(tensors: Mapping[str, tuple[int, ...]], adapter_path: str, copies: dict[str, tuple[int, ...]]
               ) -> dict[str, dict[str, Any]]:
    """``{module: {"A": shape, "B": shape, "embedding": bool}}`` from the adapter's file keys; the
    base embedding weights saved beside them (``...embed_tokens.base_layer.weight``, what Hugging
    Face PEFT saves when an embedding is targeted) go into ``copies`` as ``{module: shape}``; any
    other tensor that is not a LoRA A/B matrix is an error naming what it is."""
    pairs: dict[str, dict[str, Any]] = {}
    for key, shape in sorted(tensors.items()):
        m = _KEY.match(key)
        copy = _BASE_COPY.match(key)
        if copy is not None:  # the base's embedding saved beside the adapter: vLLM skips it (checked later)
            copies[copy.group("module")] = shape
            continue
        if m is None:
            if "lora_magnitude_vector" in key:
                what = f"a DoRA magnitude vector ({key})"
            elif "trainable_tokens" in key:
                what = f"trainable-token rows ({key})"
            elif ".lora_" in key and key.endswith(".bias"):
                what = f"a LoRA bias ({key})"
            else:
                what = f"a tensor that is not a LoRA matrix ({key}: base-model weights or a modules_to_save copy)"
            raise _fail(adapter_path, f"its weights hold {what}, which vLLM does not apply",
                        "Serve it with peftkit serve, or save a plain LoRA adapter.")
        module = m.group("module") or m.group("emodule")
        kind = m.group("kind") or m.group("ekind")
        entry = pairs.setdefault(module, {"embedding": kind.startswith("lora_embedding")})
        entry[kind[-1]] = shape
        if len(shape) != 2:
            raise _fail(adapter_path, f"{key} has shape {list(shape)}; vLLM serves LoRA on linear layers and "
                        "embeddings only (2-D matrices), not convolutions", "Serve it with peftkit serve.")
    for module, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            missing = "lora_B" if "B" not in entry else "lora_A"
            raise CheckpointError(f"adapter weights: {adapter_path} has no {missing} for {module}; the file is "
                                  "incomplete, save the adapter again.")
    if not pairs:
        raise CheckpointError(f"adapter weights: {adapter_path} holds no LoRA matrices.")
    return pairs


def base_weight_of(module: str, base_shapes: Mapping[str, tuple[int, ...]], base_config: Mapping[str, Any],
                   adapter_path: str) -> tuple[int, ...]:
    """The shape of the base weight ``module`` adapts (a tied ``lm_head``: the input embedding's)."""
    key = f"{module}.weight"
    if key in base_shapes:
        return base_shapes[key]
    if module.rsplit(".", 1)[-1] == "lm_head" and base_config.get("tie_word_embeddings", True):
        tied = [k for k in base_shapes if k.endswith("embed_tokens.weight")]
        if len(tied) == 1:
            return base_shapes[tied[0]]
    hint = closest(key, [k for k in base_shapes if k.endswith(".weight")], n=3)
    raise _fail(adapter_path, f"it adapts {module}, which the base model does not have"
                + (f" (close names: {', '.join(hint)})" if hint else ""),
                "It was made for another model; use an adapter trained on this base.")


def check_module(module: str, entry: Mapping[str, Any], base: tuple[int, ...], rank: int, fan_in_fan_out: bool,
                 adapter_path: str) -> None:
    """One module's LoRA shapes against its base weight (the formulas in the module docstring)."""
    name = module.rsplit(".", 1)[-1]
    if len(base) != 2:
        raise _fail(adapter_path, f"it adapts {module}, whose base weight has shape {list(base)}; vLLM serves "
                    "LoRA on linear layers and embeddings only", "Serve it with peftkit serve.")
    if entry["embedding"]:
        if name != "embed_tokens":
            raise _fail(adapter_path, f"it puts an embedding LoRA on {module}; vLLM serves embedding LoRA on "
                        "embed_tokens only", "Serve it with peftkit serve, or retrain without that target.")
        vocab, dim = base
        want_a, want_b = (rank, vocab), (dim, rank)
    else:
        out_f, in_f = (base[1], base[0]) if fan_in_fan_out else base
        want_a, want_b = (rank, in_f), (out_f, rank)
    if tuple(entry["A"]) != want_a or tuple(entry["B"]) != want_b:
        raise _fail(adapter_path, f"the shapes of {module}'s LoRA (A {list(entry['A'])}, B {list(entry['B'])}) do not "
                    f"fit the base weight {list(base)} at rank {rank} (expected A {list(want_a)}, B {list(want_b)})",
                    "It was made for another model; use an adapter trained on this base.")


def check_vllm_adapter(base_path: str | os.PathLike, adapter_path: str | os.PathLike,
                       max_rank: Optional[int] = None) -> dict[str, Any]:
    """Check that vLLM can serve the LoRA adapter folder ``adapter_path`` on the base model folder
    ``base_path``, reading only configs and safetensors headers.

    Raises a CheckpointError naming the first problem (a method or feature vLLM lacks, a rank above
    ``max_rank``, a module the base does not have or vLLM cannot adapt, a shape that does not fit
    the base, a missing or corrupt file). Returns what was checked: ``{"peft_type": "LORA",
    "rank": r, "max_rank": largest rank of any module, "lora_alpha", "use_rslora",
    "target_modules": sorted module suffixes, "modules": number of adapted modules}``."""
    if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank <= 0):
        raise ConfigError(f"max_rank={max_rank!r}: give a positive integer (vLLM's --max-lora-rank) or None.")
    adapter_path = os.fspath(adapter_path)
    if not os.path.isdir(adapter_path):
        raise CheckpointError(f"The adapter folder {adapter_path} does not exist.")
    config = read_json(os.path.join(adapter_path, "adapter_config.json"), "adapter config")
    pattern = check_config(config, adapter_path, max_rank)
    base_config, base_shapes = base_weight_shapes(base_path)
    copies: dict[str, tuple[int, ...]] = {}
    pairs = lora_pairs(adapter_tensor_shapes(adapter_path), adapter_path, copies)
    for module, shape in copies.items():
        base = base_weight_of(module, base_shapes, base_config, adapter_path)
        if tuple(shape) != tuple(base):
            raise _fail(adapter_path, f"it carries {module}'s weight with shape {list(shape)}, not the base's "
                        f"{list(base)} (a resized vocabulary), and vLLM ignores that weight",
                        "Serve it with peftkit serve, or serve the resized base model with vLLM.")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    ranks = []
    for module, entry in sorted(pairs.items()):
        rank = rank_of(module, config["r"], pattern)
        check_module(module, entry, base_weight_of(module, base_shapes, base_config, adapter_path), rank,
                     fan_in_fan_out, adapter_path)
        ranks.append(rank)
    return {"peft_type": "LORA", "rank": config["r"], "max_rank": max(ranks), "lora_alpha": config["lora_alpha"],
            "use_rslora": bool(config.get("use_rslora", False)),
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in pairs}), "modules": len(pairs)}


def lora_module_arg(name: str, path: str) -> str:
    """One ``--lora-modules`` value: ``name=path``, or vLLM's JSON form ``{"name": ..., "path": ...}``
    where the short form would be misread (a ``=`` in the name, a ``,`` anywhere)."""
    if "=" in name or "," in name or "," in path:
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"


def vllm_command(base_path: str | os.PathLike, adapters: Mapping[str, str | os.PathLike], host: str = "127.0.0.1",
                 port: int = 8000, max_loras: int = 8, max_lora_rank: Optional[int] = None,
                 extra_args: Sequence[str] = (), python: str = "python") -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server on ``base_path`` with every adapter of
    ``adapters`` (``{served name: folder}``), using only vLLM's documented flags::

        python -m vllm.entrypoints.openai.api_server --model BASE --host H --port P --enable-lora
            --max-loras N [--max-lora-rank R] --lora-modules name=path ... [extra_args]

    ``python``: the interpreter of vLLM's own environment. Checks the arguments, not the folders
    (run :func:`check_vllm_adapter` on each adapter first)."""
    if not adapters:
        raise ConfigError("vllm_command needs at least one adapter ({name: folder}).")
    for name, path in adapters.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ConfigError(f"Adapter name {name!r}: give a non-empty name without surrounding spaces.")
        if not os.fspath(path):
            raise ConfigError(f"Adapter {name!r} has an empty path.")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"port={port!r}: give an integer between 1 and 65535.")
    if not isinstance(max_loras, int) or isinstance(max_loras, bool) or max_loras < 1:
        raise ConfigError(f"max_loras={max_loras!r}: give a positive integer (adapters in one vLLM batch).")
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ConfigError(f"max_lora_rank={max_lora_rank!r}: vLLM accepts one of "
                          f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}.")
    if isinstance(extra_args, str):
        raise ConfigError("extra_args is a list of arguments (['--dtype', 'float32']), not one string.")
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", os.path.abspath(os.fspath(base_path)),
            "--host", str(host), "--port", str(port), "--enable-lora", "--max-loras", str(max_loras)]
    if max_lora_rank is not None:
        argv += ["--max-lora-rank", str(max_lora_rank)]
    argv += ["--lora-modules", *(lora_module_arg(n, os.path.abspath(os.fspath(p))) for n, p in adapters.items())]
    return argv + [str(a) for a in extra_args]


def smallest_max_lora_rank(rank: int) -> int:
    """The smallest value of vLLM's ``--max-lora-rank`` that serves adapters of rank ``rank``."""
    for value in VLLM_MAX_LORA_RANKS:
        if value >= rank:
            return value
    raise ConfigError(f"Rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}).")


def serve_with_vllm(base_path: str | os.PathLike, adapters: Mapping[str, str | os.PathLike], host: str = "127.0.0.1",
                    port: int = 8000, max_loras: int = 8, python: Optional[str] = None,
                    extra_args: Sequence[str] = (), dry_run: bool = False, out: Optional[TextIO] = None) -> int:
    """``peftkit serve --engine vllm``: check every adapter against the base (:func:`check_vllm_adapter`,
    all before anything starts), print vLLM's command, then run it (unless ``dry_run``) and return its
    exit status. ``python``: vLLM's interpreter (default ``$PEFTKIT_VLLM_PYTHON``, else this one);
    ``--max-lora-rank`` is the smallest vLLM value that fits the largest adapter rank."""
    out = sys.stdout if out is None else out
    if not adapters:
        raise ConfigError("--engine vllm needs at least one LoRA adapter (--adapter NAME=DIR).")
    checked = {name: check_vllm_adapter(base_path, path) for name, path in adapters.items()}
    for name, info in checked.items():
        print(f"{name}: LoRA r={info['rank']} (largest {info['max_rank']}), {info['modules']} modules "
              f"({', '.join(info['target_modules'])}): fits the base, vLLM can serve it", file=sys.stderr)
    rank = smallest_max_lora_rank(max(info["max_rank"] for info in checked.values()))
    python = python or os.environ.get("PEFTKIT_VLLM_PYTHON") or sys.executable
    argv = vllm_command(base_path, adapters, host=host, port=port, max_loras=max_loras, max_lora_rank=rank,
                        extra_args=extra_args, python=python)
    print(shlex.join(argv), file=out, flush=True)
    if dry_run:
        return 0
    try:
        return subprocess.call(argv)
    except FileNotFoundError:
        raise ConfigError(f"{python} does not exist; point PEFTKIT_VLLM_PYTHON at the python of vLLM's "
                          "environment.") from None


__all__ = ["VLLM_MAX_LORA_RANKS", "check_vllm_adapter", "serve_with_vllm", "smallest_max_lora_rank", "vllm_command"]
