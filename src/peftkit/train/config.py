"""Settings of a training run: :class:`ModelArgs`, :class:`DataConfig`, :class:`TrainConfig`, :class:`RunConfig`.

These dataclasses are the single source of the toolkit's defaults. The ``peftkit`` command generates
its flags from them (and from the method's config class, e.g. :class:`~peftkit.LoraConfig`), and a
``--config run.yaml`` file holds the same fields, either flat (``lr: 0.001``) or in sections
(``train: {lr: 0.001}``). The ``run.yaml`` written into every run folder is the nested form.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .._io import check_output_folder
from ..errors import ConfigError

FORMATS = ("text", "instruction", "chat", "classification", "seq2seq")


@dataclass
class ModelArgs:
    """The model and the method.

    Args:
        model: a local Hugging Face model folder or a Hub id (default: the bundled stories260k).
        method: the PEFT method (see ``peftkit train --help`` for the list); ``dora`` is LoRA with
            ``use_dora``.
        task: CAUSAL_LM, SEQ_2_SEQ_LM or SEQ_CLS; default: from the data format and the model.
        adapter_name: name of the trained adapter.
        dtype: dtype of the frozen base weights: float32, bfloat16 or float16 (adapters stay float32).
        trust_remote_code: allow models whose code lives in their folder (off by default).
        quantize: load the frozen base quantized (QLoRA): 4 (NF4) or 8 (int8), layer by layer with
            ``peftkit.load_quantized`` (a local model folder); the adapter stays float32. Add
            ``gradient_checkpointing`` for the QLoRA recipe's memory.
        quant_block_size: NF4 block length; must divide the in-features of every quantized layer.
        double_quant: NF4 only: also quantize the block scales.
        quant_skip_modules: module names kept in full precision (e.g. ``down_proj``).
        keep_sparsity: the model is a pruned folder (``peftkit prune``): LoRA's ``ΔW`` is multiplied by its
            masks in training, so ``peftkit merge --keep-sparsity`` is exact and keeps every pruned zero
            (sparsity-preserving LoRA; other methods keep the zeros by themselves).
    """

    model: Optional[str] = None
    method: str = "lora"
    task: Optional[Literal["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"]] = None
    adapter_name: str = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    quantize: Optional[Literal[4, 8]] = None
    quant_block_size: int = 64
    double_quant: bool = False
    quant_skip_modules: Optional[list[str]] = None
    keep_sparsity: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError on a value of the wrong type or out of range (run on construction)."""
        check_types(self, "ModelArgs")
        _at_least(self, "quant_block_size", 1)
        if not str(self.adapter_name).strip():
            raise ConfigError("adapter_name must not be empty.")


@dataclass
class DataConfig:
    """The data and how it becomes token ids.

    Args:
        data: training data: a .json, .jsonl, .csv, .tsv or .txt file, or a folder written by
            ``datasets.save_to_disk`` (default: the bundled E2E NLG demo).
        eval_data: evaluation data (same forms); default: the bundled demo's eval split, or
            ``eval_fraction`` of ``data``.
        format: text, instruction, chat, classification or seq2seq; default: detected from the columns.
        columns: map of a format's field to your column name, e.g. ``source=mr,target=ref``.
        max_length: longest tokenized example (longer ones are truncated; text is cut into windows).
        eval_fraction: share of ``data`` held out for evaluation when ``eval_data`` is not given.
        max_eval_samples: evaluate on at most this many examples.
        packing: pack several examples into each row (causal LMs); examples never attend to each other.
            Default (none): pack where the model is checked to keep packed examples apart, else pad
            batches of examples grouped by length (the run says which and why); true: pack or fail;
            false: padded batches in random order.
        separator: text between source and target (seq2seq on a decoder-only model).
        prompt_template: template of the instruction format; fields {instruction} and {input}.
        prompt_template_no_input: the same for records without an input.
    """

    data: Optional[str] = None
    eval_data: Optional[str] = None
    format: Optional[Literal["text", "instruction", "chat", "classification", "seq2seq"]] = None
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 256
    eval_fraction: float = 0.1
    max_eval_samples: Optional[int] = 200
    packing: Optional[bool] = None
    separator: str = "\n"
    prompt_template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    prompt_template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError on a value of the wrong type or out of range (run on construction)."""
        check_types(self, "DataConfig")
        _at_least(self, "max_length", 1)
        _at_least(self, "max_eval_samples", 1)
        _number_in(self, "eval_fraction", 0.0, 1.0, high_open=True)
        for name in ("prompt_template", "prompt_template_no_input"):
            check_template(getattr(self, name), name, TEMPLATE_FIELDS)


@dataclass
class TrainConfig:
    """The optimisation, evaluation and output.

    Args:
        output_dir: where the run writes (default: runs/<time>).
        max_steps: optimizer steps; overrides epochs when set.
        epochs: passes over the training data (when max_steps is not set).
        batch_size: global batch: examples per optimizer step, summed over all processes.
        micro_batch_size: examples per process and forward pass (default: as many as fit the global
            batch); gradient accumulation makes up the rest.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps with a linear warmup from 0 (warmup_steps wins when set).
        warmup_steps: steps of linear warmup.
        scheduler: learning-rate decay after warmup: linear, cosine or constant.
        max_grad_norm: clip the gradient norm to this (0 turns clipping off).
        seed: seed of the data order, the adapter init and dropout.
        logging_steps: log the training loss every N steps.
        eval_steps: evaluate every N steps (always before and after training; 0: only then).
        save_steps: write a resumable checkpoint every N steps (0: none).
        save_total_limit: keep the newest N checkpoints.
        resume: continue from the newest complete checkpoint in output_dir/checkpoints.
        early_stopping_patience: stop after N evaluations without a better metric_for_best.
        metric_for_best: the eval metric early stopping watches (eval_loss: lower is better; others higher).
        gradient_checkpointing: recompute each block's activations in the backward pass (saves memory, costs
            about one more forward). Default (none): on when the activations of a micro-batch, measured on a
            probe row, would take more than half of the free memory (the run says which and why).
        precision: auto (bf16 autocast on a GPU that has it, else fp32), fp32, bf16 or fp16.
        loss_head: causal LMs: chunked computes the LM head and the cross-entropy only at target positions,
            a chunk of rows at a time (no full tokens x vocab logits; same loss and gradients); full takes
            the model's logits everywhere; auto: chunked where the model's logits are plain lm_head(hidden),
            else full (the run says which and why).
        compile: torch.compile each decoder block: on, off, or auto (on where measured faster on the device
            type; the run says which and why). The first steps pay the compilation.
        fused_lora: LoRA linear layers with one active adapter compute base and adapter as one autograd
            node in training (same outputs and gradients; DoRA, Conv1D and quantized bases, several active
            adapters and autocast take the general path; the run says how many layers fuse).
        last_block_at_targets: with the chunked loss head, the last decoder block computes its query and
            output projections and its MLP only at target positions (same loss and gradients; Llama-style
            blocks checked by a probe; not for modules with dropout, mixtures of experts, checkpointing or
            compiled blocks; the run says which and why).
        packed_attention: packed rows: segments runs one causal attention per packed example (no row x row
            mask; same outputs and gradients), mask keeps transformers' block-diagonal mask over the row;
            auto: segments on the CPU where the model uses SDPA and a probe shows the same logits (the run
            says which and why). Not with --compile on.
        num_generations: prompts generated and printed before and after training.
        eval_generate_samples: eval examples scored by generation (exact match, ROUGE-L); 0: none.
        max_new_tokens: generation length for those.
        progress: show a progress bar.
        device: cpu, cuda, cuda:1, ... (default: the GPU if there is one).
    """

    output_dir: Optional[str] = None
    max_steps: Optional[int] = None
    epochs: int = 3
    batch_size: int = 16
    micro_batch_size: Optional[int] = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: int = 2
    resume: bool = False
    early_stopping_patience: Optional[int] = None
    metric_for_best: str = "eval_loss"
    gradient_checkpointing: Optional[bool] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    loss_head: Literal["auto", "chunked", "full"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    fused_lora: bool = True
    last_block_at_targets: bool = True
    packed_attention: Literal["auto", "segments", "mask"] = "auto"
    num_generations: int = 3
    eval_generate_samples: int = 32
    max_new_tokens: int = 48
    progress: bool = True
    device: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError on a value of the wrong type or out of range (run on construction)."""
        check_types(self, "TrainConfig")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            _number_in(self, name, 0.0, None)
        _number_in(self, "warmup_ratio", 0.0, 1.0)
        for name in ("max_steps", "epochs", "batch_size", "micro_batch_size", "logging_steps", "save_total_limit",
                     "early_stopping_patience", "max_new_tokens"):
            _at_least(self, name, 1)
        for name in ("warmup_steps", "eval_steps", "save_steps", "num_generations", "eval_generate_samples"):
            _at_least(self, name, 0)
        if self.device is not None:
            check_device(self.device)
        if self.output_dir is not None:
            check_output_folder(self.output_dir, "--output-dir", ConfigError)


SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """Everything a run needs: model and method, the method's own fields, data, training."""

    model: ModelArgs = field(default_factory=ModelArgs)
    method_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Check every section again (they may have been changed since they were built)."""
        for section in (self.model, self.data, self.train):
            section.validate()
        if not isinstance(self.method_args, dict):
            raise ConfigError("method_args must be a mapping of the method's fields.")

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name in ("model", "data", "train"):
            out[name] = plain(dataclasses.asdict(getattr(self, name)))
        out["method_args"] = plain(dict(self.method_args))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> "RunConfig":
        """Build from nested sections or flat keys (any field of any section, or of the method)."""
        sections, method_args = split_settings(values, source)
        return cls(
            model=make_section(ModelArgs, sections["model"], source),
            method_args=method_args,
            data=make_section(DataConfig, sections["data"], source),
            train=make_section(TrainConfig, sections["train"], source),
        )


def plain(value: Any) -> Any:
    """``value`` as plain YAML/JSON data: enums as their values, containers as dicts and lists (sets sorted)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_settings(values: dict[str, Any], source: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Sort settings into the sections; keys no section knows go to the method's fields.

    ``values`` may hold sections (``{"train": {...}}``), ``method_args``, or flat field names.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}.")
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    method_args: dict[str, Any] = {}
    owners = {}
    for name, cls in SECTIONS.items():
        for f in field_names(cls):
            owners.setdefault(f, name)
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            # "model" is both a section and a field: a mapping means the section
            for sub_key, sub_value in value.items():
                sections[key][str(sub_key).replace("-", "_")] = sub_value
        elif key == "method_args":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: method_args must be a mapping of the method's fields.")
            method_args.update({str(k).replace("-", "_"): v for k, v in value.items()})
        elif key in owners:
            sections[owners[key]][key] = value
        else:
            method_args[key] = value
    return sections, method_args


def make_section(cls: type, values: dict[str, Any], source: str) -> Any:
    known = field_names(cls)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}.")
    try:
        return cls(**values)  # validated on construction
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# value checks of the sections

TEMPLATE_FIELDS = ("instruction", "input")


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(obj: Any, name: str, low: int) -> None:
    value = getattr(obj, name)
    if value is not None and value < low:
        raise ConfigError(f"{name} ({_flag_name(name)}) must be >= {low}, got {value}.")


def _number_in(obj: Any, name: str, low: float, high: Optional[float], high_open: bool = False) -> None:
    import math

    value = getattr(obj, name)
    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigError(f"{name} ({_flag_name(name)}) must be a finite number, got {value}.")
    above = high is not None and (value >= high if high_open else value > high)
    if value < low or above:
        where = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} ({_flag_name(name)}) must be {where}, got {value}.")


def check_template(template: str, name: str, fields: tuple[str, ...]) -> None:
    """ConfigError unless ``template`` is a valid ``str.format`` template using only ``{field}``
    names from ``fields`` (no positional ``{}`` / ``{0}``, no attribute or index access)."""
    import string

    flag = _flag_name(name)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{name} ({flag}) is not a valid template ({exc}); write literal braces as {{{{ and }}}}.") \
            from None
    allowed = ", ".join("{" + f + "}" for f in fields)
    for _, field_name, spec, _ in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise ConfigError(f"{name} ({flag}) has a positional field {{{field_name}}}; use the named fields "
                              f"{allowed} (literal braces: {{{{ and }}}}).")
        if field_name not in fields:
            raise ConfigError(f"{name} ({flag}) has the unknown field {{{field_name}}}; its fields are {allowed} "
                              "(literal braces: {{ and }}).")
        if spec and "{" in spec:
            raise ConfigError(f"{name} ({flag}) nests a field in a format spec; use plain {allowed}.")


def check_device(device: str) -> None:
    """ConfigError unless torch can parse ``device`` (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N (or another torch device "
                          "type such as mps).") from None


def check_types(obj: Any, source: str) -> None:
    """Check each field's value against its annotation (the same rules as the method configs)."""
    import typing

    from ..config import matches_type, type_name

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not matches_type(value, hints.get(f.name, Any)):
            raise ConfigError(
                f"{source}: {f.name} must be of type {type_name(hints[f.name])}, got {type(value).__name__} {value!r}."
            )


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML settings file; PeftkitError with the line on bad YAML."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"Config file {path} is a folder; pass a .yaml file.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (key: value lines), not a {type(data).__name__}.")
    return data


def demo_settings(method: str = "lora") -> dict[str, Any]:
    """The settings of the demo run for ``method`` (``assets/data/demo.yaml``), applied by ``peftkit
    train`` when neither a model nor data is given, under any settings of the user: its sections,
    and as ``method_args`` the file's ``methods.<method>`` entry, limited to the fields the method's
    config has (so a preset never hands a field to a method that has none)."""
    import dataclasses

    from ..assets import ASSETS_DIR
    from .modeling import resolve_method

    data = load_yaml(ASSETS_DIR / "data" / "demo.yaml")
    presets = data.pop("methods", None) or {}
    name, cls, _ = resolve_method(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    own = presets.get(name) or {}
    data["method_args"] = {k: v for k, v in {**(data.get("method_args") or {}), **own}.items() if k in fields}
    return {k: v for k, v in data.items() if v}


def dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def docstring_args(cls: type) -> dict[str, str]:
    """The ``Args:`` sections of a class's docstring and its bases' as {field: text} (the class wins).

    A line ``a / b: text`` documents both ``a`` and ``b``.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__doc__" in vars(klass) and klass.__doc__:
            out.update(_docstring_args(klass.__doc__))
    return out


def _docstring_args(text: str) -> dict[str, str]:
    import inspect
    import re

    doc = inspect.cleandoc(text)
    out: dict[str, str] = {}
    in_args = False
    current: list[str] = []
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}([A-Za-z_][\w]*(?:\s*/\s*[A-Za-z_]\w*)*):\s*(.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split("/")]
            for n in current:
                out[n] = m.group(2).strip()
        elif current and line.strip():
            for n in current:
                out[n] += " " + line.strip()
    return out


__all__ = [
    "FORMATS",
    "TEMPLATE_FIELDS",
    "DataConfig",
    "ModelArgs",
    "RunConfig",
    "TrainConfig",
    "check_device",
    "check_template",
    "docstring_args",
    "dump_yaml",
    "load_yaml",
    "plain",
    "split_settings",
]
