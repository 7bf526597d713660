"""Small pieces every recipe's loop shares: accelerator, optimizer/schedule, step plan, saving."""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase, get_scheduler

from service.jobs.spec import CommonHyperparameters
from workers.checkpointing import store_dir_archive
from workers.context import JobContext
from workers.distributed import is_main_process
from workers.resume import write_state


def make_accelerator(hp: CommonHyperparameters) -> Accelerator:
    """``step_scheduler_with_optimizer=False``: recipes plan their steps on *global* batches (each rank
    takes a slice of every batch, see ``workers.data.length_bucketed_batches``), so under N processes the
    schedule must advance once per optimizer step, not N times as accelerate does by default for
    per-process dataloaders."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(mixed_precision="bf16" if bf16 else "no",
                       gradient_accumulation_steps=hp.gradient_accumulation_steps,
                       step_scheduler_with_optimizer=False)


@dataclass(frozen=True)
class StepPlan:
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(n_micro_batches: int, hp: CommonHyperparameters) -> StepPlan:
    steps_per_epoch = max(1, math.ceil(n_micro_batches / hp.gradient_accumulation_steps))
    total = steps_per_epoch * hp.n_epochs
    if hp.max_steps is not None:
        total = min(total, hp.max_steps)
    return StepPlan(n_micro_batches, steps_per_epoch, total)


def make_optimizer(params: list[nn.Parameter], hp: CommonHyperparameters,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[hp.lr_scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=int(hp.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def save_model_archive(ctx: JobContext, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                       key: str) -> str:
    """An adapter directory (LoRA) or full safetensors weights, archived to the object store.

    Under ``accelerate launch`` (DDP: every rank holds the same weights) only rank 0 writes."""
    if not is_main_process():
        return key
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        out = Path(tmp) / "model"
        if isinstance(model, PeftModel):
            model.save_pretrained(str(out), safe_serialization=True)
        else:
            model.save_pretrained(str(out), safe_serialization=True)  # type: ignore[operator]
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out))
        if ctx.training_state is not None:
            write_state(out, ctx.training_state)
        store_dir_archive(ctx.store, out, key)
        shutil.rmtree(out, ignore_errors=True)
    return key


def grad_norm(params: list[nn.Parameter]) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
