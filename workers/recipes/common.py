"""What every recipe's ``setup`` and ``cleanup`` begin and end with, written once.

``start`` seeds the RNGs from the job's seed, chooses the precision for the device and the training
type (``workers.modeling.choose_precision``), creates the accelerator and loads the base model's
tokenizer; ``release`` drops a recipe's models and optimizer so the worker process gives their memory
back before the next job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from service.jobs.spec import CommonHyperparameters
from workers.base_models import load_tokenizer, resolve_base_model
from workers.context import JobContext
from workers.loop import make_accelerator
from workers.modeling import Precision, choose_precision


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


@dataclass
class Start:
    accelerator: Accelerator
    precision: Precision
    base_dir: Path
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start(ctx: JobContext, hp: CommonHyperparameters) -> Start:
    seed_everything(ctx.seed)
    precision = choose_precision(ctx.training_type)
    base_dir = resolve_base_model(ctx.base_model, ctx.settings)
    return Start(make_accelerator(hp, precision), precision, base_dir, load_tokenizer(base_dir))


def release(recipe: object, *names: str) -> None:
    accelerator = getattr(recipe, "accelerator", None)
    if isinstance(accelerator, Accelerator):
        accelerator.free_memory()
    for name in names:
        if hasattr(recipe, name):
            delattr(recipe, name)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
