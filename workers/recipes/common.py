"""What every recipe's ``setup`` and ``cleanup`` begin and end with, written once.

``start`` seeds the RNGs from the job's seed, chooses the precision for the device and the training
type (``workers.modeling.choose_precision``), creates the accelerator, decides whether a full
fine-tune is sharded (``workers.modeling.sharding_for``) and loads the base model's tokenizer;
``prepare_training`` places the trained model (accelerate: one device or DDP; or FSDP2) and builds
its optimizer, ``prepare_frozen`` places a frozen model beside it the same way, and
``result_weights`` is what checkpoints and the result archive save; ``release`` drops a recipe's
models and optimizer so the worker process gives their memory back before the next job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from service.jobs.spec import CommonHyperparameters
from workers.attention import Layout
from workers.base_models import load_tokenizer, resolve_base_model
from workers.checkpoints import ModelWeights, Weights
from workers.context import JobContext
from workers.fsdp import ShardedModelWeights, Sharding
from workers.loop import Optimization, make_accelerator, make_optimizer
from workers.modeling import sharding_for, trainable_parameters
from workers.packing import padding_share
from workers.precision import Precision, choose_precision


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


@dataclass
class Start:
    accelerator: Accelerator
    precision: Precision
    base_dir: Path
    tokenizer: PreTrainedTokenizerBase
    #: FSDP2 over every rank (a full fine-tune with strategy ``fsdp``), else None
    sharding: Sharding | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start(ctx: JobContext, hp: CommonHyperparameters) -> Start:
    seed_everything(ctx.seed)
    precision = choose_precision(ctx.training_type)
    base_dir = resolve_base_model(ctx.base_model, ctx.settings)
    accelerator = make_accelerator(hp, precision)
    sharding = sharding_for(ctx.strategy, ctx.training_type, precision, accelerator.device)
    return Start(accelerator, precision, base_dir, load_tokenizer(base_dir), sharding)


def prepare_training(begun: Start, wrapper: nn.Module, model: nn.Module, hp: CommonHyperparameters,
                     total_steps: int) -> tuple[nn.Module, Optimization]:
    """``wrapper`` (the module the recipe calls, holding ``model``) placed for training, and the
    optimizer over ``model``'s trainable parameters.

    Sharded, the optimizer is built after ``fully_shard`` has replaced the parameters by their
    shards, and accelerate prepares only the optimizer and scheduler (the model is no DDP's)."""
    if begun.sharding is None:
        params = trainable_parameters(model)
        optimizer, scheduler = make_optimizer(params, hp, total_steps)
        module, optimizer, scheduler = begun.accelerator.prepare(wrapper, optimizer, scheduler)
    else:
        module = begun.sharding.shard(wrapper, model)
        params = trainable_parameters(model)
        optimizer, scheduler = make_optimizer(params, hp, total_steps)
        optimizer, scheduler = begun.accelerator.prepare(optimizer, scheduler)
    return module, Optimization(begun.accelerator, optimizer, scheduler, params, hp.max_grad_norm)


def prepare_frozen(begun: Start, wrapper: nn.Module, model: nn.Module) -> nn.Module:
    """A frozen model kept beside the trained one (a full DPO's reference): sharded like it, or on the device."""
    if begun.sharding is None:
        return wrapper.to(begun.device)
    return begun.sharding.shard(wrapper, model)


def result_weights(begun: Start, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   optim: Optimization) -> Weights:
    """What checkpoints and the result archive save: the model (adapter or full weights), or, sharded,
    DCP checkpoints of model and optimizer and a gathered full model at the end."""
    if begun.sharding is None:
        return ModelWeights(model, tokenizer)
    return ShardedModelWeights(model, tokenizer, optim.optimizer)


def report_layout(ctx: JobContext, layout: Layout, batches: list[list[int]], budget: int) -> None:
    """One event at the start of a packing-capable job (SFT, reward model): the attention layout, why,
    and the share of computed token slots that is padding in padded batches and in packed rows."""
    share = padding_share(batches, budget, bucket=layout.flex)
    if layout.name == "padded":
        message = f"Batches are padded ({layout.reason}): {share.padded:.1%} of the token slots are padding"
    else:
        message = (f"Batches are packed ({layout.name}: {layout.reason}): padding {share.padded:.1%} of the "
                   f"token slots padded, {share.packed:.1%} packed")
    ctx.reporter.event(message, data={"layout": layout.name, "reason": layout.reason, **share.as_data()})


def stopping(ctx: JobContext) -> bool:
    """A cancel, pause or shutdown arrived: long phases (evaluation, rollouts) end early on it and report
    nothing partial; the loop then stops at its next check. (A collective under several ranks: every
    rank asks at the same point.)"""
    return ctx.reporter.stop_reason() is not None


def release(recipe: object, *names: str) -> None:
    accelerator = getattr(recipe, "accelerator", None)
    if isinstance(accelerator, Accelerator):
        accelerator.free_memory()
    for name in names:
        if hasattr(recipe, name):
            delattr(recipe, name)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
