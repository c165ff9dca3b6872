"""The training loop: AdamW, warmup + linear/cosine decay, accumulation, clipping, autocast, eval,
early stopping, resumable checkpoints, data parallelism.

Batches. ``batch_size`` is the global batch: the examples of one optimizer step, summed over all
processes. Each process runs ``micro_batch_size`` examples per forward pass and accumulates
``batch_size / (micro_batch_size * world_size)`` of them. The order of the examples is a seeded
permutation per epoch (the last incomplete global batch of an epoch is dropped), so the data position
is a function of the step alone and a resumed or data-parallel run sees the same global batches.

Loss. Token losses are summed and divided by the number of target tokens in the whole global batch
(examples for classification), counted before the step across micro-batches and processes. So an
accumulated or data-parallel step computes the same gradient as one big batch, whatever the padding
and whatever the split (up to the order of float additions).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PeftkitError
from . import checkpoints as ckpt
from .collate import check_packing, collate, generation_batch, pack
from .config import TrainConfig
from .data import IGNORE_INDEX, Dataset
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from .metrics import MetricSums
from .reporting import MetricsLog, folder_bytes, human_bytes, peak_memory, plot_losses, print_report


def set_seed(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_peft_model(model: nn.Module) -> bool:
    from ..model import PeftModel

    return isinstance(unwrap(model), PeftModel)


def is_prompt_learning(model: nn.Module) -> bool:
    m = unwrap(model)
    return is_peft_model(m) and bool(getattr(m.active_peft_config, "is_prompt_learning", False))


def save_trainable(model: nn.Module, folder: str) -> None:
    """A PeftModel's adapter folder; for another model, its trainable tensors as safetensors."""
    m = unwrap(model)
    if is_peft_model(m):
        m.save_pretrained(folder)
        return
    from ..checkpoint import save_tensors

    os.makedirs(folder, exist_ok=True)
    save_tensors({n: p for n, p in m.named_parameters() if p.requires_grad}, os.path.join(folder, "trainable.safetensors"))


def load_trainable(model: nn.Module, folder: str) -> None:
    m = unwrap(model)
    if is_peft_model(m):
        from ..checkpoint import load_peft_weights, set_peft_model_state_dict

        name = m.active_adapters[0]
        sub = folder if name == "default" else os.path.join(folder, name)
        set_peft_model_state_dict(m, load_peft_weights(sub), name, source=sub)
        return
    from ..checkpoint import load_tensors

    tensors = load_tensors(os.path.join(folder, "trainable.safetensors"))
    params = dict(m.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


# ---------------------------------------------------------------------------------------------
# loss


def batch_count(batch: dict[str, torch.Tensor], task_type: str) -> int:
    """Number of loss terms in a batch: target tokens (LMs) or rows (classification)."""
    labels = batch["labels"]
    if task_type == "SEQ_CLS":
        return int(labels.shape[0])
    if task_type == "CAUSAL_LM":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum())


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task_type: str) -> tuple[torch.Tensor, Any]:
    """(summed loss over the batch's targets, model output)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task_type != "SEQ_CLS":
        # no KV cache in training: it costs memory, and with one transformers ignores packed position_ids
        inputs["use_cache"] = False
    if task_type == "SEQ_2_SEQ_LM":
        base = unwrap(model)
        prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare):
            inputs["decoder_input_ids"] = prepare(labels=labels)
        else:
            inputs["labels"] = labels
    out = model(**inputs)
    logits = out.logits.float()
    if task_type == "SEQ_CLS":
        return F.cross_entropy(logits, labels, reduction="sum"), out
    if task_type == "CAUSAL_LM":
        if logits.shape[1] > labels.shape[1]:  # prompt methods prepend virtual tokens
            logits = logits[:, -labels.shape[1]:]
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum"), out


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PeftkitError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PeftkitError("This GPU has no bf16; use --precision fp16 or fp32.")
    return precision


def lr_lambda(total: int, warmup: int, kind: str):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return fn


# ---------------------------------------------------------------------------------------------
# evaluation and generation


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: list[list[int]], task_type: str, device: torch.device,
                   max_new_tokens: int = 48, batch_size: int = 16, adapter_names: Optional[list[str]] = None,
                   precision: str = "fp32") -> list[str]:
    """Greedy completions of tokenized prompts (left-padded for decoder-only models)."""
    m = unwrap(model)
    was = m.training
    m.eval()
    out: list[str] = []
    left = task_type == "CAUSAL_LM"
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            batch = {k: v.to(device) for k, v in generation_batch(chunk, tokenizer.pad_token_id, left).items()}
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
            if adapter_names is not None:
                kwargs["adapter_names"] = adapter_names[i:i + batch_size]
            with autocast_context(precision, device):
                ids = m.generate(**batch, **kwargs)
            if left:
                ids = ids[:, batch["input_ids"].shape[1]:]
            out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    finally:
        m.train(was)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, tokenizer: Any, *, task_type: str, device: torch.device,
             batch_size: int = 16, generate_samples: int = 0, max_new_tokens: int = 48, precision: str = "fp32",
             dist_info: Optional[DistInfo] = None) -> dict[str, float]:
    """Loss (+ perplexity), accuracy/F1 or exact match/ROUGE-L of ``model`` on ``dataset``.

    Under data parallelism each process scores every ``world_size``-th example and the sums are
    all-reduced, so every process gets the numbers of the whole set.
    """
    info = dist_info or DistInfo(device=device)
    m = unwrap(model)
    was = m.training
    m.eval()
    sums = MetricSums(len(dataset.label_names) if task_type == "SEQ_CLS" and dataset.label_names else None)
    mine = [ex for i, ex in enumerate(dataset.examples) if i % info.world_size == info.rank]
    try:
        for i in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in collate(mine[i:i + batch_size], tokenizer.pad_token_id, task_type).items()}
            with autocast_context(precision, device):
                loss, out = loss_sum(m, batch, task_type)
            sums.loss_sum += float(loss)
            sums.count += batch_count(batch, task_type)
            if task_type == "SEQ_CLS":
                sums.add_classification(out.logits.argmax(-1), batch["labels"])
        if generate_samples and dataset.is_generation:
            chosen = [ex for ex in dataset.examples[:generate_samples] if ex.prompt_ids is not None]
            chosen = [ex for i, ex in enumerate(chosen) if i % info.world_size == info.rank]
            if chosen:
                preds = generate_texts(m, tokenizer, [ex.prompt_ids for ex in chosen], task_type, device,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision)
                for ex, pred in zip(chosen, preds):
                    sums.add_generation(pred, ex.reference or "")
    finally:
        m.train(was)
    if info.enabled:
        sums.load_tensor(all_reduce_sum(sums.as_tensor(), info))
    return sums.result(task_type)


def sample_outputs(model: nn.Module, dataset: Dataset, tokenizer: Any, task_type: str, device: torch.device,
                   n: int, max_new_tokens: int, precision: str = "fp32") -> list[tuple[str, str, str]]:
    """(input, reference, model output) for the first ``n`` eval examples."""
    if n <= 0 or not dataset.examples:
        return []
    examples = dataset.examples[:n]
    if task_type == "SEQ_CLS":
        m = unwrap(model)
        was = m.training
        m.eval()
        with torch.no_grad():
            batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id, task_type).items()}
            batch.pop("labels")
            with autocast_context(precision, device):
                pred = m(**batch).logits.argmax(-1).tolist()
        m.train(was)
        names = dataset.label_names or []
        return [(tokenizer.decode(e.input_ids, skip_special_tokens=True), names[e.labels], names[p])
                for e, p in zip(examples, pred)]
    if dataset.is_generation:
        prompts = [e.prompt_ids for e in examples]
        refs = [e.reference or "" for e in examples]
    else:  # text: continue the first tokens of each example
        prompts = [e.input_ids[: min(8, len(e.input_ids) - 1)] for e in examples]
        refs = [tokenizer.decode(e.input_ids[len(p):], skip_special_tokens=True)[:200] for e, p in zip(examples, prompts)]
    outs = generate_texts(model, tokenizer, prompts, task_type, device, max_new_tokens=max_new_tokens,
                          precision=precision)
    return [(tokenizer.decode(p, skip_special_tokens=True), r, o) for p, r, o in zip(prompts, refs, outs)]


def print_samples(title: str, samples: list[tuple[str, str, str]], task_type: str) -> None:
    if not samples:
        return
    print(f"== {title}")
    for i, (inp, ref, out) in enumerate(samples, 1):
        inp = " ".join(inp.split())
        print(f"  [{i}] input:     {inp[:300]}")
        print(f"      reference: {' '.join(ref.split())[:300]}")
        print(f"      {'predicted' if task_type == 'SEQ_CLS' else 'generated'}: {' '.join(out.split())[:300]}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# the trainer


@dataclass
class TrainResult:
    output_dir: Optional[str]
    steps: int
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    resumed_from: Optional[str] = None


class Trainer:
    """Trains the trainable parameters of ``model`` (a PeftModel, or any model with some
    ``requires_grad`` parameters) on tokenized datasets. See the module docstring for the batch and
    loss semantics. Only the main process writes files and prints.

    ``callbacks`` are called as ``callback(trainer)`` after every optimizer step (after that step's
    evaluation and checkpoint); ``trainer.step`` is the number of steps done.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, train_data: Dataset, eval_data: Optional[Dataset],
                 config: TrainConfig, *, task_type: str, dist_info: Optional[DistInfo] = None,
                 output_dir: Optional[str] = None, packing: bool = False, max_length: int = 256, quiet: bool = False,
                 callbacks: Optional[list[Any]] = None) -> None:
        self.config = config
        self.callbacks = list(callbacks or [])
        self.info = dist_info or DistInfo()
        self.device = self.info.device
        self.task_type = task_type
        self.tokenizer = tokenizer
        self.eval_data = eval_data
        self.output_dir = output_dir
        self.quiet = quiet or not self.info.is_main
        self.precision = resolve_precision(config.precision, self.device)
        self.model = model.to(self.device)
        if config.gradient_checkpointing:
            base = unwrap(self.model)
            enable = getattr(base, "gradient_checkpointing_enable", None)
            if not callable(enable):
                raise PeftkitError(f"{type(base).__name__} does not support gradient checkpointing.")
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        units = list(train_data.examples)
        if packing:
            if task_type != "CAUSAL_LM":
                raise PeftkitError("Packing is for causal LMs; turn --packing off for this task.")
            if is_prompt_learning(self.model):
                raise PeftkitError("Packing cannot be combined with prompt-learning methods (virtual tokens are "
                                   "prepended per row); turn --packing off.")
            problem = check_packing(unwrap(self.model), getattr(unwrap(self.model).config, "vocab_size", 100), self.device)
            if problem:
                raise PeftkitError(f"--packing is not safe for this model: {problem}. Turn --packing off.")
            units = pack(units, max_length)
        self.units = units
        self.train_data = train_data
        # batch geometry
        world = self.info.world_size
        B = config.batch_size
        if B < 1:
            raise PeftkitError(f"batch_size must be >= 1, got {B}.")
        if B % world:
            raise PeftkitError(f"The global batch_size {B} is not divisible by the {world} processes.")
        micro = config.micro_batch_size or B // world
        if micro < 1 or (B // world) % micro:
            raise PeftkitError(f"micro_batch_size {micro} must divide batch_size / processes = {B // world}.")
        self.micro = micro
        self.accum = B // world // micro
        if len(units) < B:
            raise PeftkitError(f"The training data has {len(units)} {'rows' if packing else 'examples'}, fewer than "
                               f"one global batch ({B}); lower --batch-size or add data.")
        self.steps_per_epoch = len(units) // B
        if config.max_steps is not None:
            if config.max_steps < 1:
                raise PeftkitError(f"max_steps must be >= 1, got {config.max_steps}.")
            self.total_steps = config.max_steps
        else:
            if config.epochs < 1:
                raise PeftkitError(f"epochs must be >= 1, got {config.epochs}.")
            self.total_steps = config.epochs * self.steps_per_epoch
        self.params = [p for p in unwrap(self.model).parameters() if p.requires_grad]
        if not self.params:
            raise PeftkitError("The model has no trainable parameters.")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(self.total_steps, warmup, config.scheduler))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.ddp: Optional[nn.Module] = None
        if self.info.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.log = MetricsLog(os.path.join(output_dir, "metrics.jsonl") if output_dir else os.devnull,
                              enabled=bool(output_dir) and self.info.is_main)
        self.step = 0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.tokens_seen = 0.0
        self.train_time = 0.0
        self.tokens_seen_run = 0.0  # this process, this invocation (for tokens per second)
        self.train_time_run = 0.0
        self._bar: Any = None
        self.resumed_from: Optional[str] = None
        self._order_cache: tuple[Optional[int], list[int]] = (None, [])

    # data -----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        """The epoch's example order (seeded; computed once per epoch, not once per step)."""
        if self._order_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1000003 + epoch)
            self._order_cache = (epoch, torch.randperm(len(self.units), generator=g).tolist())
        return self._order_cache[1]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of global step ``step`` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        B = self.config.batch_size
        order = self._order(epoch)[offset * B:(offset + 1) * B]
        world, rank, micro = self.info.world_size, self.info.rank, self.micro
        out = []
        for a in range(self.accum):
            start = (a * world + rank) * micro
            idx = order[start:start + micro]
            out.append(collate([self.units[i] for i in idx], self.tokenizer.pad_token_id, self.task_type))
        return out

    # checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Optional[str]:
        return os.path.join(self.output_dir, "checkpoints") if self.output_dir else None

    def save_checkpoint(self) -> Optional[str]:
        rngs = gather_objects(ckpt.rng_state(), self.info)
        path = None
        if self.info.is_main and self.checkpoints_dir:
            state = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "best_metric": self.best,
                     "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                     "world_size": self.info.world_size, "batch_size": self.config.batch_size,
                     "total_steps": self.total_steps, "seed": self.config.seed}
            sched = self.scheduler.state_dict()
            sched.pop("lr_lambdas", None)
            path = ckpt.write_checkpoint(self.checkpoints_dir, self.step,
                                         save_adapter=lambda folder: save_trainable(self.model, folder),
                                         optimizer=self.optimizer.state_dict(), scheduler=sched,
                                         rng=rngs, state=state)
            ckpt.prune(self.checkpoints_dir, self.config.save_total_limit)
        barrier(self.info)
        return path

    def resume(self, folder: Optional[str] = None) -> bool:
        """Load the newest complete checkpoint (or ``folder``); False if there is none."""
        verified = folder is None  # latest_checkpoint returns only folders it has verified
        if folder is None:
            if not self.checkpoints_dir:
                raise PeftkitError("Resuming needs the output_dir of the run to continue.")
            folder = ckpt.latest_checkpoint(self.checkpoints_dir)
            if folder is None:
                return False
        data = ckpt.load_checkpoint(folder, verified=verified)
        state = data["state"]
        if state.get("batch_size") != self.config.batch_size or state.get("seed") != self.config.seed:
            raise PeftkitError(f"Checkpoint {folder} was written with batch_size={state.get('batch_size')} and "
                               f"seed={state.get('seed')}; resume with the same settings.")
        load_trainable(self.model, data["adapter"])
        self.optimizer.load_state_dict(data["optimizer"])
        sched = self.scheduler.state_dict()
        sched.update(data["scheduler"])
        self.scheduler.load_state_dict(sched)
        rngs = data["rng"]
        if state.get("world_size") == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        elif not self.quiet:
            print(f"note: the checkpoint was written by {state.get('world_size')} processes and this run has "
                  f"{self.info.world_size}; dropout draws will differ from an uninterrupted run.")
        self.step = int(state["step"])
        self.best = state.get("best_metric")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.tokens_seen = float(state.get("tokens_seen", 0.0))
        self.train_time = float(state.get("train_time", 0.0))
        self.resumed_from = folder
        self.log.load(up_to_step=self.step)
        return True

    # evaluation -----------------------------------------------------------------------------
    def run_eval(self, tag: str) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        metrics = evaluate(self.model, self.eval_data, self.tokenizer, task_type=self.task_type, device=self.device,
                           batch_size=max(self.micro, 8), generate_samples=self.config.eval_generate_samples,
                           max_new_tokens=self.config.max_new_tokens, precision=self.precision, dist_info=self.info)
        self.log.log({"event": "eval", "step": self.step, "tag": tag, **metrics})
        if not self.quiet:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            self._write(f"[eval {tag} @ step {self.step}] {shown}")
        return metrics

    def _improved(self, metrics: dict[str, float]) -> bool:
        key = self.config.metric_for_best
        if key not in metrics:
            raise PeftkitError(f"metric_for_best {key!r} is not among the eval metrics {sorted(metrics)}.")
        value = metrics[key]
        lower_better = key.endswith("loss") or key.endswith("perplexity")
        better = self.best is None or (value < self.best if lower_better else value > self.best)
        if better:
            self.best = value
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return better

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text)
        sys.stdout.flush()

    # reports --------------------------------------------------------------------------------
    def start_report(self) -> dict[str, Any]:
        m = unwrap(self.model)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        total = sum(p.numel() for p in m.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            save_trainable(m, tmp)
            size = folder_bytes(tmp)
        report = {
            "trainable parameters": f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)",
            "adapter size on disk": human_bytes(size),
            "optimizer state (AdamW)": f"{human_bytes(2 * sum(p.numel() * 4 for p in self.params))} "
                                       "(two fp32 moments per trainable parameter)",
            "device / precision": f"{self.device} / {self.precision}",
            "processes": self.info.world_size,
            "global batch": f"{self.config.batch_size} = {self.micro} micro x {self.accum} accumulation x "
                            f"{self.info.world_size} processes",
            "examples / steps": f"{len(self.units)} {'packed rows' if len(self.units) != len(self.train_data) else 'examples'}, "
                                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps",
        }
        self._report_numbers = {"trainable_params": trainable, "total_params": total, "adapter_bytes": size}
        return report

    def end_report(self) -> dict[str, Any]:
        opt_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor))
        mem = peak_memory(self.device)
        tokens = float(all_reduce_sum(torch.tensor([self.tokens_seen_run], dtype=torch.float64), self.info)[0])
        tps = tokens / self.train_time_run if self.train_time_run > 0 else 0.0
        numbers = {**self._report_numbers, "optimizer_state_bytes": opt_bytes, **mem,
                   "tokens_per_second": tps, "train_seconds": self.train_time_run}
        self.report_numbers = numbers
        rows = {"steps": f"{self.step} of {self.total_steps}",
                "optimizer state": human_bytes(opt_bytes),
                "training time": f"{self.train_time_run:.1f} s (this process run)",
                "tokens per second": f"{tps:,.0f} (input tokens, all processes)"}
        for k, v in mem.items():
            rows[k.replace("_bytes", "").replace("_", " ")] = human_bytes(v)
        return rows

    # the loop -------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        counts = torch.tensor([float(sum(batch_count(b, self.task_type) for b in micro_batches))], dtype=torch.float64)
        total = float(all_reduce_sum(counts, self.info)[0])
        if total == 0:
            raise PeftkitError("A global batch has no target token; check the data and max_length.")
        # DDP averages gradients over processes: scale by world_size so that the result is sum / total
        scale = self.info.world_size / total
        runner = self.ddp if self.ddp is not None else self.model
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on device: no sync per batch
        for i, batch in enumerate(micro_batches):
            # counted on the host, before the copy to the device
            tokens = float(batch["attention_mask"].sum() if "attention_mask" in batch
                           else (batch["input_ids"] != self.tokenizer.pad_token_id).sum())
            self.tokens_seen += tokens
            self.tokens_seen_run += tokens
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sync = self.ddp is None or i == len(micro_batches) - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with autocast_context(self.precision, self.device):
                    loss, _ = loss_sum(runner, batch, self.task_type)
                scaled = loss * scale
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_total += loss.detach().double()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm and self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed = all_reduce_sum(loss_total.reshape(1).cpu(), self.info)
        return float(summed[0]) / total

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        if resume:
            found = self.resume()
            if not found and not self.quiet:
                print("note: --resume found no complete checkpoint; starting from step 0.")
        if not self.quiet:
            print_report("resources at start", self.start_report())
        else:
            self.start_report()
        if self.resumed_from and not self.quiet:
            print(f"== resumed from {self.resumed_from} (step {self.step} of {self.total_steps})")
        before: dict[str, float] = {}
        if self.step == 0:
            before = self.run_eval("before")
            if before and cfg.early_stopping_patience:
                self._improved(before)
            if self.eval_data is not None and not self.quiet:
                print_samples("before training", sample_outputs(self.model, self.eval_data, self.tokenizer, self.task_type,
                                                                self.device, cfg.num_generations, cfg.max_new_tokens,
                                                                self.precision), self.task_type)
        else:
            before = next((e for e in self.log.events if e.get("event") == "eval" and e.get("tag") == "before"), {})
            before = {k: v for k, v in before.items() if k.startswith("eval_")}
        unwrap(self.model).train()
        if self.info.is_main and cfg.progress and not self.quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        stopped = False
        window: list[float] = []
        try:
            while self.step < self.total_steps:
                batches = self.micro_batches(self.step)
                t0 = time.perf_counter()
                loss = self.train_step(batches)
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.train_time_run += dt
                self.step += 1
                window.append(loss)
                if self._bar is not None:
                    self._bar.update(1)
                    self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step % max(cfg.logging_steps, 1) == 0 or self.step == self.total_steps:
                    self.log.log({"event": "train", "step": self.step, "loss": sum(window) / len(window),
                                  "lr": self.scheduler.get_last_lr()[0], "epoch": self.step / self.steps_per_epoch})
                    window = []
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                    metrics = self.run_eval("periodic")
                    if metrics and cfg.early_stopping_patience:
                        self._improved(metrics)
                        if self.bad_evals >= cfg.early_stopping_patience:
                            stopped = True
                    self._plot()
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self)
                if stopped:
                    if not self.quiet:
                        self._write(f"early stopping at step {self.step}: {cfg.metric_for_best} did not improve "
                                    f"for {cfg.early_stopping_patience} evaluations")
                    break
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        unwrap(self.model).eval()
        after = self.run_eval("after")
        if self.output_dir and self.info.is_main:
            save_trainable(self.model, os.path.join(self.output_dir, "adapter"))
        barrier(self.info)
        if self.eval_data is not None and not self.quiet:
            print_samples("after training", sample_outputs(self.model, self.eval_data, self.tokenizer, self.task_type,
                                                           self.device, cfg.num_generations, cfg.max_new_tokens,
                                                           self.precision), self.task_type)
        end = self.end_report()
        if not self.quiet:
            print_report("resources at end", end)
        self._plot()
        if self.output_dir and self.info.is_main:
            self.log.log({"event": "summary", "step": self.step, **{k: v for k, v in after.items()},
                          **self.report_numbers})
        return TrainResult(output_dir=self.output_dir, steps=self.step, metrics_before=before, metrics_after=after,
                           report=self.report_numbers, stopped_early=stopped, resumed_from=self.resumed_from)

    def _plot(self) -> None:
        if self.output_dir and self.info.is_main:
            title = os.path.basename(os.path.abspath(self.output_dir))
            plot_losses(self.log.events, os.path.join(self.output_dir, "loss.png"), title=title)
