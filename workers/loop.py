"""The optimisation loop the recipes share: accumulate, clip, step, report, evaluate, checkpoint.

A recipe keeps what is its own — how a micro-batch becomes a loss and metrics, how it evaluates,
what it saves — and hands those in as callables; the loop owns everything that is the same for
every method:

* epochs of pre-planned index batches, ``gradient_accumulation_steps`` micro-batches per step,
  stopping at ``plan.total_steps``;
* cancellation (checked before every step), a ``nan_loss`` failure on a non-finite loss;
* gradient clipping (the logged ``grad_norm`` is the norm *before* clipping, as the Hugging Face
  Trainer and TRL log it), optimizer and scheduler steps;
* per-step metrics ``learning_rate`` (the rate the step used), ``num_tokens`` (cumulative),
  ``tokens_per_second`` and ``epoch``, reported with the job's progress;
* evaluation every ``eval_every_steps`` and at the end, checkpoints every ``checkpoint_every_steps``
  and at the end.

Gradient accumulation (:func:`accumulate`) weights each micro-batch explicitly (by examples for
pair losses, by trained tokens for token losses), so the accumulated gradient is the gradient of the
loss over the whole step even when the last group of an epoch is short or micro-batches differ in
size. ``Accelerator.backward`` divides every loss by ``gradient_accumulation_steps``; since the
weights already sum to one, :func:`backward` undoes that division.

Adopting it elsewhere: DPO's ``train`` is this loop with
``step_fn = lambda group: accumulate(acc, policy, group, self._micro, example_weights(group))``
where ``_micro`` returns ``(loss, metrics, attention_mask.sum())`` from ``_loss``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from service.jobs.spec import CommonHyperparameters
from workers.context import JobContext, JobFailure
from workers.resume import capture_state, load_resume_point

#: One micro-batch: ``indices`` -> (loss with gradients, metrics, tokens processed).
MicroBatchFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float], int]]
#: One optimizer step's forward/backward over its micro-batches -> (metrics incl. "loss", tokens).
StepFn = Callable[[list[list[int]]], tuple[dict[str, float], int]]


@dataclass
class LoopResult:
    status: str  # "succeeded" | "cancelled" | "paused" | "preempted"
    step: int
    tokens: int
    metrics: dict[str, float]


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


def accumulate(accelerator: Accelerator, model: nn.Module, group: Sequence[list[int]], micro: MicroBatchFn,
               weights: Sequence[float]) -> tuple[dict[str, float], int]:
    """Forward and backward every micro-batch of one step, ``loss_i * weights[i]`` each.

    Gradients are synchronised across processes only on the last micro-batch (``no_sync``).
    """
    if len(weights) != len(group):
        raise ValueError("one weight per micro-batch")
    accumulated: dict[str, float] = {}
    tokens = 0
    for position, (indices, weight) in enumerate(zip(group, weights, strict=True)):
        last = position == len(group) - 1
        with _sync_if(accelerator, model, last):
            loss, metrics, n_tokens = micro(indices)
            backward(accelerator, loss * weight)
        combine(accumulated, metrics, weight)
        tokens += n_tokens
    return accumulated, tokens


def _sync_if(accelerator: Accelerator, model: nn.Module, sync: bool) -> Any:
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def run_training(
    *,
    ctx: JobContext,
    hp: CommonHyperparameters,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[nn.Parameter],
    batches_by_epoch: Sequence[Sequence[list[int]]],
    total_steps: int,
    step_fn: StepFn,
    save_checkpoint: Callable[[int, dict[str, float]], None],
    evaluate: Callable[[int], object] | None = None,
) -> LoopResult:
    """Run the steps; on success the last evaluation and checkpoint are done, the archive is not.

    With ``ctx.resume_from`` set, weights, optimizer, scheduler and RNG come back from that
    checkpoint and the loop skips the steps it already trained, so every step is trained exactly
    once. A pause request checkpoints the current step and returns ``"paused"``.
    """
    reporter = ctx.reporter
    step, tokens = 0, 0
    last: dict[str, float] = {}

    def checkpoint(at: int) -> None:
        ctx.training_state = capture_state(step=at, tokens=tokens, metrics=last, optimizer=optimizer,
                                           scheduler=scheduler)
        try:
            save_checkpoint(at, last)
        finally:
            ctx.training_state = None

    if ctx.resume_from is not None:
        resumed_at, key = ctx.resume_from
        state = load_resume_point(ctx.store, key, accelerator.unwrap_model(model), optimizer, scheduler,
                                  ctx.workdir)
        step, tokens, last = int(state["step"]), int(state["tokens"]), dict(state["metrics"])
        reporter.resumed(step)
    reporter.progress(step=step, total_steps=total_steps)
    done = 0  # optimizer steps planned so far, trained now or before the resume
    model.train()
    for epoch, batches in enumerate(batches_by_epoch):
        for start in range(0, len(batches), hp.gradient_accumulation_steps):
            if done >= total_steps:
                break
            done += 1
            if done <= step:
                continue  # trained before the resume
            reason = reporter.stop_reason()
            if reason in ("pause", "preempt"):  # preempt: the worker is shutting down; the task re-queues
                checkpoint(step)
                return LoopResult("paused" if reason == "pause" else "preempted", step, tokens, last)
            if reason is not None:
                reporter.event("Training stopped: the job was cancelled", level="warn")
                return LoopResult("cancelled", step, tokens, last)
            began = time.perf_counter()
            group = list(batches[start:start + hp.gradient_accumulation_steps])
            metrics, step_tokens = step_fn(group)
            if not math.isfinite(metrics["loss"]):
                raise JobFailure("nan_loss", f"loss became {metrics['loss']} at step {step + 1}")
            norm = accelerator.clip_grad_norm_(params, hp.max_grad_norm)
            metrics["grad_norm"] = float(norm) if norm is not None else math.nan
            metrics["learning_rate"] = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            metrics["num_tokens"] = float(tokens)
            metrics["tokens_per_second"] = step_tokens / max(time.perf_counter() - began, 1e-9)
            metrics["epoch"] = epoch + (start + len(group)) / len(batches)
            reporter.step(step, total_steps, metrics, trained_tokens=tokens)
            last = metrics
            if evaluate is not None and hp.eval_every_steps and step % hp.eval_every_steps == 0 \
                    and step < total_steps:
                evaluate(step)
            if hp.checkpoint_every_steps and step % hp.checkpoint_every_steps == 0 and step < total_steps:
                checkpoint(step)
    if evaluate is not None:
        evaluate(step)
    checkpoint(step)
    return LoopResult("succeeded", step, tokens, last)
