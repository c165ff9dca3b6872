"""High-level entry points: :func:`train` a run from settings, load a model + adapters for inference.

``peftkit train`` is ``train(RunConfig.from_dict(settings))``; the Python API is the same::

    from peftkit.train import RunConfig, train
    result = train(RunConfig.from_dict({"max_steps": 20, "r": 4}))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any, Optional

from .._io import atomic_write_bytes
from ..errors import PeftkitError
from .config import DataConfig, RunConfig, dump_yaml, field_names, load_yaml, plain
from .data import DataError, prepare_data
from .distributed import DistInfo, broadcast_object, setup, teardown
from .lock import RunLock
from .loop import Trainer, TrainResult
from .modeling import (
    build_peft_config,
    check_method_args,
    default_model_path,
    load_model,
    quant_options,
    load_tokenizer,
    method_fields,
    resolve_method,
    task_for,
)
from .resume import check_resume_settings
from .step import set_seed

RUN_FILE = "run.yaml"


def _default_output_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _holds_run(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "checkpoints")) and any(
        n.startswith("step-") for n in os.listdir(os.path.join(folder, "checkpoints"))
    ) or os.path.isdir(os.path.join(folder, "adapter"))


def train(run: RunConfig, *, train_data: Any = None, eval_data: Any = None, quiet: bool = False,
          callbacks: Optional[list[Any]] = None) -> TrainResult:
    """Fine-tune ``run.model.model`` with ``run.model.method`` on the data of ``run``.

    ``train_data`` / ``eval_data`` may be records, a ``datasets.Dataset``, or file paths (they
    replace ``run.data.data`` / ``run.data.eval_data``). Under torchrun every process calls this;
    only the main process writes and prints. ``callbacks``: see :class:`~peftkit.train.Trainer`.

    The output folder is locked for the run (a second run into it fails at once, naming the first),
    and every check (settings, data, model, the checkpoint to resume and whether it fits) is done
    before anything is written into it.
    """
    run.validate()
    info = setup(run.train.device)
    try:
        return _train(run, info, train_data, eval_data, quiet, callbacks)
    finally:
        teardown(info)


def _train(run: RunConfig, info: DistInfo, train_data: Any, eval_data: Any, quiet: bool,
           callbacks: Optional[list[Any]]) -> TrainResult:
    cfg = run.train
    method_name, _, _ = resolve_method(run.model.method)  # fail on a bad method before loading anything
    check_method_args(method_name, run.method_args)
    # the method config's own checks (r > 0, num_virtual_tokens given, ...), before loading anything
    build_peft_config(method_name, run.method_args, run.model.task, run.model.model or default_model_path())
    output_dir = cfg.output_dir
    if output_dir is None:
        if cfg.resume:
            raise PeftkitError("--resume continues a run: pass the run's --output-dir.")
        output_dir = broadcast_object(_default_output_dir(), info)
    with _output_lock(output_dir, info):
        if not cfg.resume and _holds_run(output_dir):
            raise PeftkitError(f"{output_dir} already holds a run (adapter/ or checkpoints/); pass --resume to "
                               "continue it, or choose another --output-dir.")
        return _train_locked(run, info, method_name, output_dir, train_data, eval_data, quiet, callbacks)


@contextlib.contextmanager
def _output_lock(output_dir: str, info: DistInfo) -> Iterator[None]:
    """Hold the output folder's :class:`RunLock` (taken by the main process; every process fails alike)."""
    lock = RunLock(output_dir) if info.is_main else None
    error: Optional[str] = None
    if lock is not None:
        try:
            lock.acquire()
        except PeftkitError as exc:
            error = str(exc)
            if not info.enabled:
                raise
    error = broadcast_object(error, info)
    if error is not None:
        raise PeftkitError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _train_locked(run: RunConfig, info: DistInfo, method_name: str, output_dir: str, train_data: Any,
                  eval_data: Any, quiet: bool, callbacks: Optional[list[Any]]) -> TrainResult:
    cfg = run.train
    model_path = run.model.model or default_model_path()
    masks = None
    if run.model.keep_sparsity:  # checked before anything loads
        from .compression import read_model_masks

        masks = read_model_masks(model_path)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path, run.model.trust_remote_code)
    data = prepare_data(run.data, tokenizer, lambda fmt: run.model.task or task_for(fmt, model_path,
                                                                                     run.model.trust_remote_code),
                        train_source=train_data, eval_source=eval_data, seed=cfg.seed)
    labels = data.label_names
    quant = quant_options(run.model)
    model = load_model(model_path, data.task_type, num_labels=len(labels) if labels else None,
                       id2label=dict(enumerate(labels)) if labels else None, dtype=run.model.dtype,
                       trust_remote_code=run.model.trust_remote_code, pad_token_id=tokenizer.pad_token_id,
                       quantize=quant)
    peft_config = build_peft_config(method_name, run.method_args, data.task_type, model_path)
    from ..model import get_peft_model

    set_seed(cfg.seed)  # the adapter's init depends on the seed only
    peft_model = get_peft_model(model, peft_config, adapter_name=run.model.adapter_name)
    if masks is not None:
        from ..methods.lora import keep_sparsity

        masked = keep_sparsity(peft_model, masks)
        if not quiet and info.is_main:
            print(f"== sparsity kept: LoRA ΔW masked on {len(masked)} layer(s)")
    trainer = Trainer(peft_model, tokenizer, data.train, data.eval, dataclasses.replace(cfg, output_dir=output_dir),
                      task_type=data.task_type, dist_info=info, output_dir=output_dir, packing=run.data.packing,
                      max_length=run.data.max_length, quiet=quiet, callbacks=callbacks)
    resolved = _resolved_settings(run, model_path, method_name, peft_model, data, trainer, output_dir,
                                  train_data, eval_data)
    checkpoint = _checkpoint_to_resume(trainer, output_dir, resolved, quiet) if cfg.resume else None
    if info.is_main:  # every check is done: from here on the run writes
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(output_dir, RUN_FILE), dump_yaml(resolved).encode("utf-8"))
    if not quiet and info.is_main:
        if data.train is not None and data.train.dropped:
            print(f"note: {data.train.dropped} training examples were dropped: max_length "
                  f"{run.data.max_length} cut off their whole completion.")
        base = "" if quant is None else (" (base quantized: " + ("int8" if quant["bits"] == 8 else
                                         f"NF4, blocks of {quant['block_size']}"
                                         + (", double quant" if quant["double_quant"] else "")) + ")")
        print(f"== peftkit train: {method_name} on {model_path}{base} ({data.task_type}), data format {data.format}, "
              f"writing to {output_dir}")
    return trainer.fit(checkpoint=checkpoint)


def _checkpoint_to_resume(trainer: Trainer, output_dir: str, resolved: dict[str, Any],
                          quiet: bool) -> Optional[dict[str, Any]]:
    """The checkpoint ``--resume`` continues from, checked against the run's settings (run.yaml: see
    :mod:`peftkit.train.resume` for the rule) and against this run's model and optimizer; None (a
    note) if there is no usable one: the run starts over."""
    import yaml

    checkpoint = trainer.find_checkpoint(check_fit=False)
    if checkpoint is None:
        if not quiet and trainer.info.is_main:
            print("note: --resume found no usable checkpoint; starting from step 0.")
        return None
    allowed = check_resume_settings(os.path.join(output_dir, RUN_FILE), yaml.safe_load(dump_yaml(resolved)),
                                    load_yaml)
    trainer.check_checkpoint(checkpoint)
    if allowed and not quiet and trainer.info.is_main:
        print("note: resuming with changed settings that do not change what is trained: " + "; ".join(allowed))
    return checkpoint


def _resolved_settings(run: RunConfig, model_path: str, method_name: str, peft_model: Any, data: Any,
                       trainer: Trainer, output_dir: str, train_data: Any, eval_data: Any) -> dict[str, Any]:
    import torch
    import transformers

    from .. import __version__

    out = run.to_dict()
    out["model"]["model"] = model_path
    out["model"]["method"] = method_name
    out["model"]["task"] = data.task_type
    config = peft_model.peft_config[run.model.adapter_name]
    out["method_args"] = plain({f.name: getattr(config, f.name) for f in method_fields(type(config))})
    from .data import bundled_data

    src = run.data.data
    if train_data is not None:
        src = train_data if isinstance(train_data, (str, os.PathLike)) else "<in-memory data>"
    elif src is None:
        src = bundled_data()[0]
    ev = run.data.eval_data
    if eval_data is not None:
        ev = eval_data if isinstance(eval_data, (str, os.PathLike)) else "<in-memory data>"
    elif ev is None and run.data.data is None and train_data is None:
        ev = bundled_data()[1]
    out["data"]["data"] = os.fspath(src)
    out["data"]["eval_data"] = os.fspath(ev) if ev is not None else None
    out["data"]["format"] = data.format
    out["data"]["columns"] = dict(data.columns)
    if trainer.packed:  # auto (none) resolved: a --config of this run.yaml packs as this run did
        out["data"]["packing"] = True
    out["train"]["output_dir"] = output_dir
    out["train"]["micro_batch_size"] = trainer.micro
    out["resolved"] = {
        "world_size": trainer.info.world_size,
        "gradient_accumulation_steps": trainer.accum,
        "steps_per_epoch": trainer.steps_per_epoch,
        "total_steps": trainer.total_steps,
        "train_examples": len(data.train) if data.train is not None else 0,
        "eval_examples": len(data.eval) if data.eval is not None else 0,
        "label_names": data.label_names,
        "precision": trainer.precision,
        "batching": trainer.batching,
        "loss_head": trainer.loss_head.describe(),
        "packed_attention": trainer.segments.describe(),
        "versions": {"peftkit": str(__version__), "torch": str(torch.__version__),
                     "transformers": str(transformers.__version__)},
    }
    return out


# ---------------------------------------------------------------------------------------------
# inference: a base model with one or more adapters


def read_run_file(adapter_dir: str) -> Optional[dict[str, Any]]:
    """The run.yaml of the run that wrote ``adapter_dir`` (its parent folder), if there is one."""
    for folder in (adapter_dir, os.path.dirname(os.path.abspath(adapter_dir))):
        path = os.path.join(folder, RUN_FILE)
        if os.path.isfile(path):
            try:
                return load_yaml(path)
            except PeftkitError:
                return None
    return None


def _num_labels_from_tensors(adapter_dir: str) -> Optional[int]:
    from ..checkpoint import load_peft_weights

    for key, t in load_peft_weights(adapter_dir).items():
        if key.endswith(("score.weight", "classifier.weight", "classifier.out_proj.weight")) and t.dim() == 2:
            return int(t.shape[0])
    return None


@dataclasses.dataclass
class Loaded:
    model: Any
    tokenizer: Any
    task_type: str
    model_path: str
    data_config: DataConfig
    format: Optional[str]
    label_names: Optional[list[str]]
    adapters: list[str]


def data_config_of(run: dict[str, Any]) -> DataConfig:
    """The DataConfig a run used, from its ``run.yaml`` (unknown keys ignored)."""
    d = {k: v for k, v in (run.get("data") or {}).items() if k in field_names(DataConfig)}
    return dataclasses.replace(DataConfig(), **d)


def _base_model_path(model: Optional[str], configs: list[Any], run: Optional[dict[str, Any]]) -> str:
    """``model``, else the first adapter's base model, else the run's, else the bundled one."""
    model_path = model
    if model_path is None and configs:
        model_path = configs[0].base_model_name_or_path
    if model_path is None and run:
        model_path = (run.get("model") or {}).get("model")
    model_path = model_path or default_model_path()
    if configs and not os.path.exists(model_path) and model is None and os.path.isabs(model_path):
        raise PeftkitError(f"The adapter's base model {model_path} does not exist here; pass --model.")
    return model_path


def _quantization(quantize: Any, run: Optional[dict[str, Any]]) -> Any:
    """The quantization options of ``load_model``: the run's (``"run"``), none (None), or 4 / 8."""
    run_model = (run or {}).get("model") or {}
    if quantize == "run":
        return quant_options(run_model)
    if quantize is None:
        return None
    return quant_options({**run_model, "quantize": quantize})


def load_for_inference(adapters: list[tuple[str, str]], model: Optional[str] = None, *, task: Optional[str] = None,
                       dtype: str = "float32", device: Any = "cpu", trust_remote_code: bool = False,
                       quantize: Any = "run", keep_sparsity: Any = "run") -> Loaded:
    """A base model with the given adapters loaded (``[(name, folder), ...]``), on ``device``.

    The base model is ``model`` or the first adapter's ``base_model_name_or_path``; the task, the
    prompt format and the class names come from the adapter config and the run's ``run.yaml``.
    ``quantize``: ``"run"`` loads the base quantized as the run that wrote the first adapter did
    (``peftkit train --quantize``), None loads it in float, 4 / 8 quantize it (NF4 / int8).
    ``keep_sparsity``: ``"run"`` masks LoRA's ``ΔW`` with the pruned base's masks when the run that wrote
    the first adapter trained that way (``--keep-sparsity``), True always, False never.
    """
    from ..config import PeftConfig
    from ..model import PeftModel

    configs = []
    for name, folder in adapters:
        if not os.path.isdir(folder):
            raise PeftkitError(f"Adapter folder {folder} does not exist.")
        configs.append(PeftConfig.from_pretrained(folder))
    run = read_run_file(adapters[0][1]) if adapters else None
    model_path = _base_model_path(model, configs, run)
    task_type = task or (str(configs[0].task_type) if configs and configs[0].task_type else None)
    data_cfg = DataConfig()
    fmt = None
    label_names = None
    if run:
        data_cfg = data_config_of(run)
        fmt = data_cfg.format
        label_names = (run.get("resolved") or {}).get("label_names")
        task_type = task_type or (run.get("model") or {}).get("task")
    if task_type is None:
        task_type = task_for("text", model_path, trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    num_labels = None
    if task_type == "SEQ_CLS":
        num_labels = len(label_names) if label_names else (_num_labels_from_tensors(adapters[0][1]) if adapters else None)
        if label_names is None and num_labels:
            label_names = [str(i) for i in range(num_labels)]
    quant = _quantization(quantize, run)
    base = load_model(model_path, task_type, num_labels=num_labels,
                      id2label=dict(enumerate(label_names)) if label_names else None, dtype=dtype,
                      trust_remote_code=trust_remote_code, pad_token_id=tokenizer.pad_token_id, quantize=quant)
    out: Any = base
    names = []
    for i, ((name, folder), config) in enumerate(zip(adapters, configs)):
        if i == 0:
            out = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            out.load_adapter(folder, adapter_name=name)
        names.append(name)
    if adapters and (keep_sparsity is True or keep_sparsity == "run"
                     and bool(((run or {}).get("model") or {}).get("keep_sparsity"))):
        from ..methods.lora import keep_sparsity as mask_lora_deltas
        from .compression import read_model_masks

        mask_lora_deltas(out, read_model_masks(model_path))
    out.to(device)
    out.eval()
    return Loaded(model=out, tokenizer=tokenizer, task_type=task_type, model_path=model_path, data_config=data_cfg,
                  format=fmt, label_names=label_names, adapters=names)


__all__ = ["DataError", "Loaded", "load_for_inference", "read_run_file", "train"]
