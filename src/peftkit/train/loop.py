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
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import PeftkitError
from . import checkpoints as ckpt
from . import resume as resume_mod
from .collate import check_packing, collate, length_grouped, pack
from .config import TrainConfig
from .data import Dataset
from .distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from .evaluation import evaluate, generate_texts, print_samples, sample_outputs
from .loss_head import LossForward, choose_loss_head, target_index
from .reporting import MetricsLog, folder_bytes, human_bytes, peak_memory, plot_losses, print_report
from .segments import SEGMENTS, choose_segments, segment_lengths
from .speed import choose_compile, eager_stance, enable_checkpointing, plan_speed, remove_compile
from .step import (
    autocast_context,
    batch_count,
    build_optimizer,
    build_scheduler,
    grad_scaler,
    loss_sum,
    lr_lambda,
    optimizer_step,
    resolve_precision,
    set_seed,
)
from .trainable import is_peft_model, is_prompt_learning, load_trainable, save_trainable, unwrap


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
                 output_dir: Optional[str] = None, packing: Optional[bool] = None, max_length: int = 256,
                 quiet: bool = False, callbacks: Optional[list[Any]] = None) -> None:
        self.config = config
        config.validate()  # again: fields may have been set after construction
        self.callbacks = list(callbacks or [])
        self.info = dist_info or DistInfo()
        self.device = self.info.device
        self.task_type = task_type
        self.tokenizer = tokenizer
        self.eval_data = eval_data
        self.output_dir = output_dir
        self.quiet = quiet or not self.info.is_main
        self.precision = resolve_precision(config.precision, self.device)
        self.model = self._place_model(model)
        self.units = self._training_units(train_data, packing, max_length)
        self.train_data = train_data
        self._plan_batches(self.packed)
        self.loss_head = choose_loss_head(self.model, task_type, config.loss_head, self.device,
                                          config.last_block_at_targets)
        self.loss_forward = LossForward(self.model, task_type, self.loss_head)
        # before the speed plan compiles blocks or turns checkpointing on: a refusal leaves the model as it came
        self.segments = choose_segments(unwrap(self.model), config.packed_attention, self.packed,
                                        choose_compile(unwrap(self.model), config.compile, self.device).enabled,
                                        self.device)
        self._plan_speed()
        self._build_optimization()
        self.ddp = self._wrap_ddp()
        self.log = MetricsLog(os.path.join(output_dir, "metrics.jsonl") if output_dir else os.devnull,
                              enabled=bool(output_dir) and self.info.is_main)
        self._init_progress()

    # setup ----------------------------------------------------------------------------------
    def _place_model(self, model: nn.Module) -> nn.Module:
        """``model`` on the device, with gradient checkpointing when the config asks for it."""
        model = model.to(self.device)
        if self.config.gradient_checkpointing:
            base = unwrap(model)
            if not enable_checkpointing(base):
                raise PeftkitError(f"{type(base).__name__} does not support gradient checkpointing.")
        return model

    def _plan_speed(self) -> None:
        """Checkpointing by the memory estimate (when not set), then compiling the blocks (when chosen)."""
        longest = max(self.units, key=lambda u: len(u.input_ids))
        probe = collate([longest], self.tokenizer.pad_token_id, self.task_type)
        with autocast_context(self.precision, self.device):
            self.checkpointing, self.compile_plan, self.fused_lora = plan_speed(
                unwrap(self.model), self.loss_forward, probe, self.micro * len(longest.input_ids), self.config,
                self.device, prompt_learning=is_prompt_learning(self.model))

    def _training_units(self, train_data: Dataset, packing: Optional[bool], max_length: int) -> list[Any]:
        """The rows the steps draw from: the training examples, or rows packed from them. ``packing``
        None (auto) packs where it is exact, else groups padded batches by length (causal LMs);
        ``self.batching`` says which and why."""
        units = list(train_data.examples)
        self.packed, self.group_by_length = False, False
        self.batching = "padded batches in random order" + (" (packing off)" if packing is False else "")
        if packing is False:
            return units
        problem = self._packing_problem()
        if problem is None:
            self.packed = True
            self.batching = f"packed rows of up to {max_length} tokens (examples kept apart: position ids restart)"
            return pack(units, max_length)
        if packing:
            raise PeftkitError(f"--packing is not safe for this model: {problem}. Turn --packing off.")
        self.group_by_length = self.task_type == "CAUSAL_LM"
        if self.group_by_length:
            self.batching = f"padded batches grouped by length (not packed: {problem})"
        return units

    def _packing_problem(self) -> Optional[str]:
        """None when packed rows keep this model's examples apart, else why packing does not apply."""
        if self.task_type != "CAUSAL_LM":
            return "packing is for causal LMs"
        if is_prompt_learning(self.model):
            return "prompt-learning methods prepend virtual tokens per row"
        base = unwrap(self.model)
        return check_packing(base, getattr(base.config, "vocab_size", 100), self.device)

    def _plan_batches(self, packing: bool) -> None:
        """The batch geometry: micro-batch size, accumulation, steps per epoch and in all."""
        world = self.info.world_size
        B = self.config.batch_size
        if B % world:
            raise PeftkitError(f"The global batch_size {B} is not divisible by the {world} processes.")
        micro = self.config.micro_batch_size or B // world
        if micro < 1 or (B // world) % micro:
            raise PeftkitError(f"micro_batch_size {micro} must divide batch_size / processes = {B // world}.")
        self.micro = micro
        self.accum = B // world // micro
        if len(self.units) < B:
            raise PeftkitError(f"The training data has {len(self.units)} {'rows' if packing else 'examples'}, fewer "
                               f"than one global batch ({B}); lower --batch-size or add data.")
        self.steps_per_epoch = len(self.units) // B
        self.total_steps = self._count_steps()

    def _count_steps(self) -> int:
        config = self.config
        return config.max_steps if config.max_steps is not None else config.epochs * self.steps_per_epoch

    def _build_optimization(self) -> None:
        """The trainable parameters, AdamW, its LR schedule and (fp16) the gradient scaler."""
        self.params = [p for p in unwrap(self.model).parameters() if p.requires_grad]
        if not self.params:
            raise PeftkitError("The model has no trainable parameters.")
        self.optimizer = build_optimizer(self.params, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, self.total_steps)
        self.scaler = grad_scaler(self.precision)

    def _wrap_ddp(self) -> Optional[nn.Module]:
        if not self.info.enabled:
            return None
        # DDP wraps the training forward (loss included): the chunked loss head calls the body directly
        return nn.parallel.DistributedDataParallel(
            self.loss_forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _init_progress(self) -> None:
        """The counters a checkpoint saves and restores, and this invocation's own."""
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
            order = torch.randperm(len(self.units), generator=g).tolist()
            if self.group_by_length:
                order = length_grouped(order, [len(u.input_ids) for u in self.units], self.config.batch_size, g)
            self._order_cache = (epoch, order)
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
            sched = self.scheduler.state_dict()
            sched.pop("lr_lambdas", None)
            path = ckpt.write_checkpoint(self.checkpoints_dir, self.step,
                                         save_adapter=lambda folder: save_trainable(self.model, folder),
                                         optimizer=self.optimizer.state_dict(), scheduler=sched,
                                         rng=rngs, state=self._trainer_state())
            ckpt.prune(self.checkpoints_dir, self.config.save_total_limit, protect=path)
        barrier(self.info)
        return path

    def _trainer_state(self) -> dict[str, Any]:
        """The checkpoint's trainer_state.json."""
        return {"step": self.step, "epoch": self.step / self.steps_per_epoch, "best_metric": self.best,
                "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                "world_size": self.info.world_size, "batch_size": self.config.batch_size,
                "total_steps": self.total_steps, "seed": self.config.seed}

    def _checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint of this run must agree on (the rest of _trainer_state may differ)."""
        return {"batch_size": self.config.batch_size, "seed": self.config.seed, "total_steps": self.total_steps}

    def find_checkpoint(self, folder: Optional[str] = None, check_fit: bool = True) -> Optional[dict[str, Any]]:
        """The newest checkpoint that verifies, reads and fits this run (or ``folder``), read into
        memory and applied to nothing; None if there is none. Checkpoints that fail to verify or read
        are skipped with a warning; one that does not fit this run raises CheckpointError (unless
        ``check_fit`` is False: then :meth:`check_checkpoint` is the caller's)."""
        if folder is None:
            if not self.checkpoints_dir:
                raise PeftkitError("Resuming needs the output_dir of the run to continue.")
            data = resume_mod.newest_usable(self.checkpoints_dir, self.model)
            if data is None:
                return None
        else:
            data = resume_mod.read_checkpoint(folder, self.model)
        if check_fit:
            self.check_checkpoint(data)
        return data

    def check_checkpoint(self, data: dict[str, Any]) -> None:
        """CheckpointError unless the checkpoint ``data`` fits this run's model, optimizer and batches."""
        resume_mod.check_fits(data, self.model, self.optimizer, self._checkpoint_state())

    def resume(self, folder: Optional[str] = None, checkpoint: Optional[dict[str, Any]] = None) -> bool:
        """Load the newest usable checkpoint (or ``folder``, or ``checkpoint`` from
        :meth:`find_checkpoint`); False if there is none. Nothing is changed unless it all fits."""
        data = checkpoint if checkpoint is not None else self.find_checkpoint(folder)
        if data is None:
            return False
        self._restore(data)
        self.resumed_from = data["folder"]
        self.log.load(up_to_step=self.step)
        return True

    def _restore(self, data: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, RNG states and counters from a loaded checkpoint."""
        state = data["state"]
        load_trainable(self.model, data["adapter"], data.get("adapter_tensors"))
        self.optimizer.load_state_dict(data["optimizer"])
        sched = self.scheduler.state_dict()
        sched.update(data["scheduler"])
        self.scheduler.load_state_dict(sched)
        if state.get("world_size") == self.info.world_size:
            ckpt.set_rng_state(data["rng"][self.info.rank])
        elif not self.quiet:
            print(f"note: the checkpoint was written by {state.get('world_size')} processes and this run has "
                  f"{self.info.world_size}; dropout draws will differ from an uninterrupted run.")
        self.step = int(state["step"])
        self.best = state.get("best_metric")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.tokens_seen = float(state.get("tokens_seen", 0.0))
        self.train_time = float(state.get("train_time", 0.0))

    # evaluation -----------------------------------------------------------------------------
    def run_eval(self, tag: str) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        with eager_stance(self.compile_plan):
            metrics = evaluate(self.model, self.eval_data, self.tokenizer, task_type=self.task_type,
                               device=self.device, batch_size=max(self.micro, 8),
                               generate_samples=self.config.eval_generate_samples,
                               max_new_tokens=self.config.max_new_tokens, precision=self.precision,
                               dist_info=self.info, loss_head=self.loss_head)
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

    def _show_samples(self, title: str) -> None:
        """Print the model's outputs on the first eval examples (``num_generations`` of them)."""
        if self.eval_data is None or self.quiet:
            return
        cfg = self.config
        with eager_stance(self.compile_plan):
            samples = sample_outputs(self.model, self.eval_data, self.tokenizer, self.task_type, self.device,
                                     cfg.num_generations, cfg.max_new_tokens, self.precision)
        print_samples(title, samples, self.task_type)

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
            "examples / steps": f"{len(self.units)} {'packed rows' if self.packed else 'examples'}, "
                                f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps",
            "batches": self.batching,
            "loss head": self.loss_head.describe(),
            "activation checkpointing": self.checkpointing.describe(),
            "compile": self.compile_plan.describe(),
            "fused LoRA": self.fused_lora,
            "packed attention": self.segments.describe(),
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

    def _plot(self) -> None:
        if self.output_dir and self.info.is_main:
            title = os.path.basename(os.path.abspath(self.output_dir))
            plot_losses(self.log.events, os.path.join(self.output_dir, "loss.png"), title=title)

    # one optimizer step ---------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        """One optimizer step on this process's micro-batches; returns the global batch's mean loss."""
        counts = torch.tensor([float(sum(batch_count(b, self.task_type) for b in micro_batches))], dtype=torch.float64)
        total = float(all_reduce_sum(counts, self.info)[0])
        if total == 0:
            raise PeftkitError("A global batch has no target token; check the data and max_length.")
        # DDP averages gradients over processes: scale by world_size so that the result is sum / total
        loss_total = self._accumulate(micro_batches, scale=self.info.world_size / total)
        optimizer_step(self.optimizer, self.scheduler, self.scaler, self.params, self.config.max_grad_norm)
        summed = all_reduce_sum(loss_total.reshape(1).cpu(), self.info)
        return float(summed[0]) / total

    def _accumulate(self, micro_batches: list[dict[str, torch.Tensor]], scale: float) -> torch.Tensor:
        """Forward and backward of each micro-batch (DDP syncs on the last one); their summed loss."""
        runner = self.ddp if self.ddp is not None else self.loss_forward
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on device: no sync per batch
        for i, batch in enumerate(micro_batches):
            self._count_tokens(batch)  # on the host, before the copy to the device
            if self.loss_head.path == "chunked":  # the loss positions, found on the host: no sync on the device
                batch["target_index"] = target_index(batch["labels"])
            segments = segment_lengths(batch["position_ids"]) if self.segments.enabled else None
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if segments is not None:  # the packed examples' lengths, from the host
                batch[SEGMENTS] = segments
            sync = self.ddp is None or i == len(micro_batches) - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx, self.segments.active():  # the backward too: checkpointed blocks run their forward again
                with autocast_context(self.precision, self.device):
                    loss = runner(batch)
                scaled = loss * scale
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_total += loss.detach().double()
        return loss_total

    def _count_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        tokens = float(batch["attention_mask"].sum() if "attention_mask" in batch
                       else (batch["input_ids"] != self.tokenizer.pad_token_id).sum())
        self.tokens_seen += tokens
        self.tokens_seen_run += tokens

    # the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, checkpoint: Optional[dict[str, Any]] = None) -> TrainResult:
        """Train to ``total_steps`` (or until early stopping), first resuming if ``resume`` (from
        ``checkpoint``, found by :meth:`find_checkpoint`, when given). A run that starts at step 0
        starts its metrics log over."""
        self._start(resume, checkpoint)
        before = self._before_training()
        stopped = self._train_steps()
        after = self._after_training()
        return TrainResult(output_dir=self.output_dir, steps=self.step, metrics_before=before, metrics_after=after,
                           report=self.report_numbers, stopped_early=stopped, resumed_from=self.resumed_from)

    def _start(self, resume: bool, checkpoint: Optional[dict[str, Any]] = None) -> None:
        """Resume (if asked) and print the resources at start."""
        found = (resume or checkpoint is not None) and self.resume(checkpoint=checkpoint)
        if not found:
            if resume and not self.quiet:
                print("note: --resume found no usable checkpoint; starting from step 0.")
            self.log.reset()
        report = self.start_report()
        if not self.quiet:
            print_report("resources at start", report)
        if self.resumed_from and not self.quiet:
            print(f"== resumed from {self.resumed_from} (step {self.step} of {self.total_steps})")

    def _before_training(self) -> dict[str, float]:
        """The eval and samples before training; on a resumed run, the logged eval instead."""
        if self.step == 0:
            before = self.run_eval("before")
            if before and self.config.early_stopping_patience:
                self._improved(before)
            self._show_samples("before training")
            return before
        logged = next((e for e in self.log.events if e.get("event") == "eval" and e.get("tag") == "before"), {})
        return {k: v for k, v in logged.items() if k.startswith("eval_")}

    def _train_steps(self) -> bool:
        """Optimizer steps up to ``total_steps``; True if early stopping ended them sooner."""
        unwrap(self.model).train()
        self._open_bar()
        window: list[float] = []  # the losses since the last train log
        try:
            while self.step < self.total_steps:
                window.append(self._timed_step())
                self._log_train(window)
                stop = self._periodic_eval()
                self._periodic_checkpoint()
                for callback in self.callbacks:
                    callback(self)
                if stop:
                    if not self.quiet:
                        self._write(f"early stopping at step {self.step}: {self.config.metric_for_best} did not "
                                    f"improve for {self.config.early_stopping_patience} evaluations")
                    return True
        finally:
            self._close_bar()
        return False

    def _timed_step(self) -> float:
        """The next step's train_step, timed and counted; its loss."""
        batches = self.micro_batches(self.step)
        t0 = time.perf_counter()
        loss = self.train_step(batches)
        dt = time.perf_counter() - t0
        self.train_time += dt
        self.train_time_run += dt
        self.step += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        return loss

    def _log_train(self, window: list[float]) -> None:
        """Every ``logging_steps`` and at the last step: log the mean loss of ``window``, and empty it."""
        if self.step % max(self.config.logging_steps, 1) == 0 or self.step == self.total_steps:
            self.log.log({"event": "train", "step": self.step, "loss": sum(window) / len(window),
                          "lr": self.scheduler.get_last_lr()[0], "epoch": self.step / self.steps_per_epoch})
            window.clear()

    def _periodic_eval(self) -> bool:
        """Every ``eval_steps`` before the last step: eval and plot; True if early stopping is due."""
        cfg = self.config
        if not (cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps):
            return False
        stop = False
        metrics = self.run_eval("periodic")
        if metrics and cfg.early_stopping_patience:
            self._improved(metrics)
            stop = self.bad_evals >= cfg.early_stopping_patience
        self._plot()
        return stop

    def _periodic_checkpoint(self) -> None:
        cfg = self.config
        if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    def _after_training(self) -> dict[str, float]:
        """The final eval; the adapter; the samples and resources at end; the plot and summary."""
        unwrap(self.model).eval()
        remove_compile(unwrap(self.model), self.compile_plan)  # the model leaves as it came
        after = self.run_eval("after")
        if self.output_dir and self.info.is_main:
            save_trainable(self.model, os.path.join(self.output_dir, "adapter"))
        barrier(self.info)
        self._show_samples("after training")
        end = self.end_report()
        if not self.quiet:
            print_report("resources at end", end)
        self._plot()
        if self.output_dir and self.info.is_main:
            self.log.log({"event": "summary", "step": self.step, **after, **self.report_numbers})
        return after

    def _open_bar(self) -> None:
        if self.info.is_main and self.config.progress and not self.quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# The helpers below lived in this module before it was split; they stay importable from here.
__all__ = [
    "Trainer",
    "TrainResult",
    "autocast_context",
    "batch_count",
    "evaluate",
    "generate_texts",
    "is_peft_model",
    "is_prompt_learning",
    "load_trainable",
    "loss_sum",
    "lr_lambda",
    "print_samples",
    "resolve_precision",
    "sample_outputs",
    "save_trainable",
    "set_seed",
    "unwrap",
]
