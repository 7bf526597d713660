"""The one training loop every recipe runs (SFT, reward model, DPO, PPO, reinforcement).

A recipe keeps what is its own — what one step does (a forward/backward over micro-batches, or a
rollout and its PPO updates), how it evaluates, what its weights are — and hands those in; the loop
owns everything that is the same for every method, so stop, pause, cancel, checkpoints and resume
mean the same everywhere:

* epochs of pre-planned index batches, ``batches_per_step`` of them per step (the gradient
  accumulation group for supervised methods, one prompt batch for online RL), stopping at
  ``total_steps``;
* cancel, pause and preemption (checked before every step and, by steps that sample, between tokens;
  a pause or a worker's shutdown checkpoints the current step first);
* resume: with ``ctx.resume_from`` set, weights, optimizer, scheduler, RNG and the recipe's extra
  state come back from that checkpoint and the steps it covers are skipped, so every step is
  trained exactly once;
* per-step metrics ``num_tokens`` (cumulative), ``tokens_per_second`` and ``epoch``, reported with
  the job's progress (the step itself reports ``loss``, ``grad_norm`` and the ``learning_rate`` it used);
* evaluation every ``eval_every_steps`` and at the end, checkpoints every ``checkpoint_every_steps``
  and at the end, then the result archive.

Optimizer steps go through :class:`Optimization`: clip (the logged ``grad_norm`` is the norm before
clipping, as the Hugging Face Trainer and TRL log it), step, schedule. A skipped update (a non-finite
loss in PPO) still advances the schedule, so it ends where it was planned to.

Loss scaling (fp16 autocast, ``workers.precision``): the loop owns the ``torch.amp.GradScaler``, not
accelerate (which refuses fp16 on the CPU and keeps its scaler out of our checkpoints). It is handed
to the accelerator after the optimizer is prepared, so ``accelerator.backward`` multiplies the loss
by the scale and accelerate's optimizer wrapper never steps it; :meth:`Optimization.step` unscales
before clipping (``grad_norm`` is the true norm), lets the scaler skip an update whose gradients
hold inf/NaN (the scale halves; ``loss_scale`` and ``skipped_update`` are logged) and updates the
scale. Its state is saved with every checkpoint and restored on resume.

Gradient accumulation (:func:`accumulate`) weights each micro-batch explicitly (by examples for pair
losses, by trained tokens for token losses), so the accumulated gradient is the gradient of the loss
over the whole step even when the last group of an epoch is short. ``Accelerator.backward`` divides
every loss by ``gradient_accumulation_steps``; since the weights already sum to one, :func:`backward`
undoes that division.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn
from transformers import get_scheduler

from service.jobs.spec import CommonHyperparameters
from workers import fsdp
from workers.archives import STATE_FILE, checkpoint_key, fetch_adapter, final_adapter_key, store_dir_archive
from workers.checkpoints import (
    Weights,
    capture_state,
    is_sharded,
    load_resume_point,
    save_archive,
)
from workers.checkpoints import save_checkpoint as write_checkpoint
from workers.context import JobContext, JobFailure
from workers.precision import Precision, grad_scaler
from workers.selection import Selection

#: One micro-batch: ``indices`` -> (loss with gradients, metrics, tokens processed).
MicroBatchFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float], int]]
#: One whole step over its index batches -> (metrics incl. "loss", tokens processed).
StepFn = Callable[[list[list[int]]], tuple[dict[str, float], int]]
DISTRIBUTED_TIMEOUT_S = 600.0


class Stateful(Protocol):
    """Recipe state beyond weights, optimizer and RNG that a resumed job must get back (tensors,
    numbers, lists and dicts of them: it is read back with ``weights_only=True``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StepInterrupted(Exception):
    """Raised by a step that saw a stop request mid-way (e.g. while sampling): the step did not happen,
    and it has put back whatever it consumed (the RNG state), so a checkpoint now is the previous step's."""


class NonFiniteLoss(ArithmeticError):
    def __init__(self, value: float) -> None:
        super().__init__(f"loss became {value}")
        self.value = value


# --------------------------------------------------------------------------- set-up pieces


def make_accelerator(hp: CommonHyperparameters, precision: Precision | None = None) -> Accelerator:
    """``step_scheduler_with_optimizer=False``: recipes plan their steps on *global* batches (each rank
    takes a slice of every batch, see ``workers.batching.length_bucketed_batches``), so under N processes
    the schedule must advance once per optimizer step, not N times as accelerate does by default."""
    mixed = precision.mixed if precision is not None else "no"
    # accelerate keeps one process-wide state; a worker process that ran a job in another precision
    # (or a test) must start it afresh. The process group (PartialState) is kept.
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed):
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=hp.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False, kwargs_handlers=[process_group_timeout()])
    if mixed == "fp16":
        # fp16 autocast on every device (accelerate turns it on for accelerators only), and no scaler of
        # accelerate's: the loop's (:class:`Optimization`) scales, unscales, skips and checkpoints
        accelerator.native_amp = True
        accelerator.scaler = None
    return accelerator


def process_group_timeout() -> InitProcessGroupKwargs:
    """How long a collective waits for a missing rank before it fails (gloo and NCCL alike):
    ``ALIGND_DISTRIBUTED_TIMEOUT`` seconds, 600 by default. A rank that died mostly fails its peers at
    once (closed connections); this bounds the rest, e.g. a node that hangs. It must exceed the
    longest time one rank works alone while the others wait: rank 0 uploading a checkpoint archive."""
    seconds = float(os.environ.get("ALIGND_DISTRIBUTED_TIMEOUT") or DISTRIBUTED_TIMEOUT_S)
    return InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))


@dataclass(frozen=True)
class StepPlan:
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(n_micro_batches: int, hp: CommonHyperparameters, batches_per_step: int | None = None) -> StepPlan:
    per_step = batches_per_step or hp.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(n_micro_batches / per_step))
    total = steps_per_epoch * hp.n_epochs
    if hp.max_steps is not None:
        total = min(total, hp.max_steps)
    return StepPlan(n_micro_batches, steps_per_epoch, total)


def parameter_groups(params: Sequence[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm scales (every parameter of fewer than two
    dimensions) are not pulled towards zero, as the Hugging Face Trainer and nanoGPT do."""
    decayed = [p for p in params if p.ndim >= 2]
    plain = [p for p in params if p.ndim < 2]
    return [group for group in ({"params": decayed, "weight_decay": weight_decay},
                                {"params": plain, "weight_decay": 0.0}) if group["params"]]


def make_optimizer(params: Sequence[nn.Parameter], hp: CommonHyperparameters, total_updates: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(parameter_groups(params, hp.weight_decay), lr=hp.learning_rate)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[hp.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(hp.warmup_ratio * total_updates),
                              num_training_steps=total_updates)
    return optimizer, scheduler


@dataclass
class Optimization:
    """The optimizer, its schedule and the trainable parameters, stepped the same way by every recipe.

    ``scaler``: the fp16 loss scaler (``workers.precision.grad_scaler``), None otherwise."""

    accelerator: Accelerator
    optimizer: Any  # torch.optim.Optimizer, possibly accelerate-wrapped
    scheduler: Any
    params: list[nn.Parameter]
    max_grad_norm: float
    scaler: torch.amp.GradScaler | None = None

    def __post_init__(self) -> None:
        if self.scaler is None and self.accelerator.mixed_precision == "fp16":
            self.scaler = grad_scaler(Precision(torch.float32, "fp16"), self.accelerator.device)
        # accelerator.backward scales the loss with ``accelerator.scaler``; set only now, after the
        # optimizer was prepared, so accelerate's optimizer wrapper does not step the scaler itself
        if self.scaler is not None:
            self.accelerator.scaler = self.scaler

    def learning_rate(self) -> float:
        """The rate the next update will use."""
        return float(self.scheduler.get_last_lr()[0])

    def _clip(self) -> torch.Tensor | None:
        if fsdp.is_sharded(self.params):
            return fsdp.clip_grad_norm_(self.accelerator, self.params, self.max_grad_norm)
        if self.scaler is not None:  # already unscaled: accelerate's clip would unscale a second time
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        return self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)  # type: ignore[no-any-return]

    def _agree_on_overflow(self) -> None:
        """Sharded gradients: each rank checked only its shards for inf/NaN; every rank must skip
        together (DDP needs nothing: its gradients are all-reduced before the check)."""
        if not (fsdp.is_sharded(self.params) and torch.distributed.is_initialized()):
            return
        assert self.scaler is not None
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        for found in state["found_inf_per_device"].values():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)

    def step(self) -> dict[str, float]:
        """Clip, update, advance the schedule; returns ``grad_norm`` (before clipping) and the
        ``learning_rate`` this update used (and, scaled, ``loss_scale`` and ``skipped_update``)."""
        used = self.learning_rate()
        extra: dict[str, float] = {}
        if self.scaler is None:
            norm = self._clip()
            self.optimizer.step()
        else:
            scale = float(self.scaler.get_scale())
            self.scaler.unscale_(self.optimizer)
            self._agree_on_overflow()
            norm = self._clip()
            self.scaler.step(self.optimizer)  # skipped when unscale_ found inf/NaN gradients
            self.scaler.update()
            skipped = float(self.scaler.get_scale()) < scale
            extra = {"loss_scale": scale, "skipped_update": float(skipped)}
        with warnings.catch_warnings():  # a skipped first update: torch warns that no step happened
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm) if norm is not None else math.nan, "learning_rate": used, **extra}

    def skip(self) -> float:
        """Drop this update's gradients but advance the schedule; returns the rate it would have used."""
        used = self.learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when no update has happened yet: that is the point
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return used


# --------------------------------------------------------------------------- one step


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """``accelerator.backward`` for a loss that is already weighted for accumulation."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        loss = loss * accelerator.gradient_accumulation_steps  # accelerate divides by it again
    accelerator.backward(loss)


def example_weights(group: Sequence[Sequence[int]]) -> list[float]:
    """Each micro-batch's share of the step's examples (per-example means, e.g. pair losses)."""
    total = sum(len(indices) for indices in group)
    return [len(indices) / total for indices in group]


def combine(accumulated: dict[str, float], metrics: dict[str, float], weight: float) -> None:
    """Fold one micro-batch's metrics in: names ending in ``min``/``max`` keep the extreme,
    everything else is a weighted mean (the weights of a step sum to one)."""
    for name, value in metrics.items():
        if name.endswith("min"):
            accumulated[name] = min(accumulated.get(name, math.inf), value)
        elif name.endswith("max"):
            accumulated[name] = max(accumulated.get(name, -math.inf), value)
        else:
            accumulated[name] = accumulated.get(name, 0.0) + value * weight


def sync_if(accelerator: Accelerator, model: nn.Module, sync: bool) -> Any:
    """Gradients are all-reduced only on the last micro-batch of a step (``no_sync`` before it)."""
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def accumulate(accelerator: Accelerator, model: nn.Module, group: Sequence[list[int]], micro: MicroBatchFn,
               weights: Sequence[float]) -> tuple[dict[str, float], int]:
    """Forward and backward every micro-batch of one step, ``loss_i * weights[i]`` each."""
    if len(weights) != len(group):
        raise ValueError("one weight per micro-batch")
    accumulated: dict[str, float] = {}
    tokens = 0
    for position, (indices, weight) in enumerate(zip(group, weights, strict=True)):
        with sync_if(accelerator, model, position == len(group) - 1):
            loss, metrics, n_tokens = micro(indices)
            backward(accelerator, loss * weight)
        combine(accumulated, metrics, weight)
        tokens += n_tokens
    return accumulated, tokens


def gradient_step(optim: Optimization, forward_backward: StepFn) -> StepFn:
    """A supervised step: accumulate gradients over the group, then one update (never on a non-finite loss)."""

    def step(group: list[list[int]]) -> tuple[dict[str, float], int]:
        metrics, tokens = forward_backward(group)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLoss(metrics["loss"])
        metrics |= optim.step()
        return metrics, tokens

    return step


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    status: str  # "succeeded" | "cancelled" | "paused" | "preempted"
    step: int
    tokens: int
    metrics: dict[str, float]
    adapter_key: str | None = None


def run_training(
    *,
    ctx: JobContext,
    hp: CommonHyperparameters,
    model: nn.Module,
    optim: Optimization,
    weights: Weights,
    batches_by_epoch: Sequence[Sequence[list[int]]],
    total_steps: int,
    step_fn: StepFn,
    checkpoint_metrics: Sequence[str],
    evaluate: Callable[[int], object] | None = None,
    batches_per_step: int | None = None,
    extra_state: Stateful | None = None,
    result_weights: Weights | None = None,
) -> LoopResult:
    """Run the steps; on success the last evaluation, the last checkpoint and the result archive
    (``result_weights``, by default ``weights``) are written."""
    reporter = ctx.reporter
    per_step = batches_per_step or hp.gradient_accumulation_steps
    step, tokens = 0, 0
    last: dict[str, float] = {}
    selection = Selection.of(hp)  # best checkpoint, early stopping, retention (workers.selection)
    follow_eval = evaluate is not None and (hp.checkpoint_selection == "best" or hp.early_stopping is not None)
    checkpointed_at: int | None = None

    def checkpoint(at: int, evaluated: object = None) -> None:
        nonlocal checkpointed_at
        # registered before the state is captured, so a job resumed from this checkpoint knows of it
        retired = selection.saved(at, checkpoint_key(ctx.job_id, at, attempt=ctx.attempt))
        state = capture_state(step=at, tokens=tokens, metrics=last,
                              optimizer=None if is_sharded(weights) else optim.optimizer,  # sharded: in the shards
                              scheduler=optim.scheduler, scaler=optim.scaler,
                              extra=extra_state.state_dict() if extra_state is not None else None)
        state["selection"] = selection.state_dict()
        metrics = {k: v for k, v in last.items() if k in checkpoint_metrics}
        if isinstance(evaluated, dict):  # the evaluation of this step, for the checkpoints list
            metrics |= {k: float(v) for k, v in evaluated.items() if k.startswith("eval/") and math.isfinite(v)}
        write_checkpoint(ctx, weights, at, metrics, state)
        checkpointed_at = at
        for _, old in retired:  # retention, once the new one is written: the row first, then the files
            reporter.drop_checkpoint(old)
            if reporter.is_main:
                ctx.store.delete_prefix(old.rsplit("/", 1)[0] + "/")

    def evaluate_and_follow(at: int) -> None:
        assert evaluate is not None
        result = evaluate(at)
        selection.observe(at, result)
        if follow_eval:  # a checkpoint at every evaluation, so the best one can be taken
            checkpoint(at, result)

    def stop(reason: str | None) -> LoopResult | None:
        if reason in ("pause", "preempt"):  # preempt: the worker is shutting down; the runner re-queues
            checkpoint(step)
            return LoopResult("paused" if reason == "pause" else "preempted", step, tokens, last)
        if reason is not None:
            reporter.event("Training stopped: the job was cancelled", level="warn")
            return LoopResult("cancelled", step, tokens, last)
        return None

    if ctx.resume_from is not None:
        _, key = ctx.resume_from
        state = load_resume_point(ctx.store, key, weights, optim.optimizer, optim.scheduler, ctx.workdir,
                                  scaler=optim.scaler)
        if extra_state is not None:
            extra_state.load_state_dict(state.get("extra") or {})
        step, tokens, last = int(state["step"]), int(state["tokens"]), dict(state["metrics"])
        selection.load_state_dict(state.get("selection") or {})
        reporter.resumed(step)
    reporter.progress(step=step, total_steps=total_steps)
    done = 0  # steps planned so far, trained now or before the resume
    stopped_early = False
    model.train()
    for epoch, batches in enumerate(batches_by_epoch):
        for start in range(0, len(batches), per_step):
            if done >= total_steps or stopped_early:
                break
            done += 1
            if done <= step:
                continue  # trained before the resume
            stopped = stop(reporter.stop_reason())
            if stopped is not None:
                return stopped
            began = time.perf_counter()
            group = list(batches[start:start + per_step])
            try:
                metrics, step_tokens = step_fn(group)
            except NonFiniteLoss as exc:
                raise JobFailure("nan_loss", f"loss became {exc.value} at step {step + 1}") from None
            except StepInterrupted:
                stopped = stop(reporter.stop_reason() or "cancel")
                assert stopped is not None
                return stopped
            step += 1
            tokens += step_tokens
            metrics["num_tokens"] = float(tokens)
            metrics["tokens_per_second"] = step_tokens / max(time.perf_counter() - began, 1e-9)
            metrics["epoch"] = epoch + (start + len(group)) / len(batches)
            reporter.step(step, total_steps, metrics, trained_tokens=tokens)
            last = metrics
            if evaluate is not None and hp.eval_every_steps and step % hp.eval_every_steps == 0 \
                    and step < total_steps:
                evaluate_and_follow(step)
                if selection.should_stop():
                    stopped_early = True
                    reporter.event(f"Early stopping at step {step}: {selection.metric} has not improved for "
                                   f"{selection.stale} evaluations (best {selection.best_value:.4f} at step "
                                   f"{selection.best_step})", data={"step": step, "metric": selection.metric,
                                                                    "best_step": selection.best_step})
                    break
            if hp.checkpoint_every_steps and step % hp.checkpoint_every_steps == 0 and step < total_steps \
                    and checkpointed_at != step:
                checkpoint(step)
    if evaluate is not None and not stopped_early:
        evaluate_and_follow(step)
    if checkpointed_at != step:
        checkpoint(step)
    final = final_adapter_key(ctx.job_id, attempt=ctx.attempt)
    if hp.checkpoint_selection == "best" and evaluate is not None:
        key = select_best(ctx, selection, result_weights or weights, final)
    else:
        key = save_archive(ctx, result_weights or weights, final)
    return LoopResult("succeeded", step, tokens, last, adapter_key=key)


def select_best(ctx: JobContext, selection: Selection, weights: Weights, final: str) -> str:
    """The result archive from the best evaluation's checkpoint: its files without the training state."""
    best = selection.key_of(selection.best_step) if selection.best_step is not None else None
    if best is None or is_sharded(weights):
        why = "no evaluation gave a finite value" if best is None else "sharded checkpoints are not selectable"
        ctx.reporter.event(f"Checkpoint selection kept the last step: {why}", level="warn")
        return save_archive(ctx, weights, final)
    if ctx.reporter.is_main:
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
            directory = fetch_adapter(ctx.store, best, Path(tmp) / "model")
            (directory / STATE_FILE).unlink(missing_ok=True)
            store_dir_archive(ctx.store, directory, final)
    ctx.reporter.event(f"Selected checkpoint step {selection.best_step} by {selection.metric}="
                       f"{selection.best_value:.4f}", data={"step": selection.best_step, "metric": selection.metric,
                                                            "value": selection.best_value, "checkpoint": best})
    return final
