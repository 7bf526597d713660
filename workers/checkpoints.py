"""Checkpoints and result archives: what a job saves, where, and how a later attempt resumes from it.

An archive is one ``.tar.gz`` object in the store (``jobs/<id>/attempt_<a>/step_<n>/adapter.tar.gz`` for
a checkpoint, ``jobs/<id>/attempt_<a>/adapter.tar.gz`` for the result) whose files sit at its top level, so that
extracting it gives a directory ``peft.PeftModel.from_pretrained`` (or ``from_pretrained`` for a
full fine-tune) loads directly. A checkpoint also holds ``training_state.pt``: optimizer and
scheduler state, the RNG states, the step, the tokens seen, the last metrics and whatever extra state
the recipe keeps (PPO's KL controller, sampler and value function). The data position follows from
the step, because batches are planned deterministically from the job's seed. The claim's attempt
number is part of every key: a worker that lost its job (cut off, frozen, then woken) may still
finish an upload before its next fenced database write is refused, and under its own attempt's
prefix that upload can never replace an object the current attempt's rows point to.

The archive is uploaded as a single object and its database row is written after the upload, so a
checkpoint is either complete or invisible. ``training_state.pt`` is written by the worker itself and
read with ``weights_only=True``: no pickled code is ever executed.

What a model's weights are is the recipe's business (one adapter, several adapters and a head, full
weights): it hands a :class:`Weights` to the loop, which calls it for every checkpoint and resume.
Under several ranks only rank 0 writes. A sharded (FSDP) full fine-tune's checkpoints are sharded
instead, model and optimizer in ``torch.distributed.checkpoint`` files beside a small archive
(``workers.sharded_checkpoints``); ``load_resume_point`` reads either kind, a sharded one onto any
number of ranks.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from workers.archives import STATE_FILE, checkpoint_key, fetch_adapter, store_dir_archive
from workers.distributed import is_main_process
from workers.sharded_checkpoints import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from service.storage import ObjectStore
    from workers.context import JobContext

# --------------------------------------------------------------------------- weights


class Weights(Protocol):
    """A recipe's trained weights as files: written into a checkpoint, restored from one."""

    def write(self, directory: Path) -> None: ...

    def restore(self, directory: Path) -> None: ...


def _find(model: nn.Module, kind: type) -> Any:
    for module in model.modules():
        if isinstance(module, kind):
            return module
    return None


def restore_weights(model: nn.Module, directory: Path, adapter_name: str = "default") -> None:
    """Load a saved adapter (or full weights) into the live, possibly wrapped, model in place."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    peft_model = _find(model, PeftModel)
    if peft_model is not None:
        weights = load_file(str(directory / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint has weights the model lacks: {unexpected[:3]}")
        return
    full = _find(model, PreTrainedModel)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    _, unexpected = full.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint has weights the model lacks: {unexpected[:3]}")


@dataclass
class ModelWeights:
    """One model: a peft adapter directory (LoRA) or full safetensors weights with the tokenizer."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None = None

    def write(self, directory: Path) -> None:
        from peft import PeftModel

        self.model.save_pretrained(str(directory), safe_serialization=True)  # type: ignore[operator]
        if not isinstance(self.model, PeftModel) and self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def restore(self, directory: Path) -> None:
        restore_weights(self.model, directory)


def is_collective(weights: Weights) -> bool:
    """Weights spread over the ranks (FSDP): every rank takes part in writing them (the gather)."""
    return bool(getattr(weights, "collective", False))


def is_sharded(weights: Weights) -> bool:
    """Weights whose checkpoints are sharded (``workers.sharded_checkpoints``), optimizer state included."""
    return bool(getattr(weights, "sharded", False))


def save_archive(ctx: JobContext, weights: Weights, key: str, state: dict[str, Any] | None = None) -> str:
    """``weights`` (plus a training state, for a checkpoint) archived to ``key``; rank 0 writes
    (collective weights are gathered by every rank first)."""
    if not is_main_process() and not is_collective(weights):
        return key
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        weights.write(out)
        if not is_main_process():
            return key
        if state is not None:
            torch.save(state, out / STATE_FILE)
        store_dir_archive(ctx.store, out, key)
        shutil.rmtree(out, ignore_errors=True)
    return key


def save_checkpoint(ctx: JobContext, weights: Weights, step: int, metrics: dict[str, float],
                    state: dict[str, Any]) -> str:
    """A resumable checkpoint of ``step``, then its row (the row only once the archive is complete)."""
    if is_sharded(weights):
        key = save_sharded_checkpoint(ctx, weights, step, state)  # type: ignore[arg-type]
    else:
        key = save_archive(ctx, weights, checkpoint_key(ctx.job_id, step, attempt=ctx.attempt), state)
    ctx.reporter.checkpoint(step, metrics, key)
    return key


# --------------------------------------------------------------------------- training state


def _python_rng_as_tensor() -> torch.Tensor:
    version, internal, gauss = random.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)


def _restore_python_rng(value: torch.Tensor) -> None:
    items = value.tolist()
    random.setstate((items[0], tuple(items[1:-1]), None))


def capture_rng() -> dict[str, Any]:
    """torch's (CPU and CUDA) and Python's RNG states."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": _python_rng_as_tensor()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    _restore_python_rng(state["python_rng"])


def capture_state(*, step: int, tokens: int, metrics: dict[str, float], optimizer: Any, scheduler: Any,
                  extra: dict[str, Any] | None = None, scaler: Any = None) -> dict[str, Any]:
    """``optimizer`` None: its state is saved elsewhere (a sharded checkpoint's shards). ``scaler``: an
    fp16 run's ``GradScaler`` (its scale and growth tracker), so a resumed run scales as it would have."""
    return {"step": step, "tokens": tokens, "metrics": dict(metrics),
            **({"optimizer": optimizer.state_dict()} if optimizer is not None else {}),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            "scheduler": scheduler.state_dict(), **capture_rng(), "extra": extra or {}}


def load_resume_point(store: ObjectStore, key: str, weights: Weights, optimizer: Any, scheduler: Any,
                      workdir: Path, scaler: Any = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, loss scaler and RNG from a checkpoint archive; returns its
    state (the recipe's ``extra`` state included, for the caller to hand back)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        directory = fetch_adapter(store, key, Path(tmp) / "checkpoint")
        state: dict[str, Any] = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
        if is_sharded_checkpoint(directory):  # model and optimizer from the shards, onto any world size
            load_sharded_checkpoint(store, directory, weights.model, optimizer)  # type: ignore[attr-defined]
        else:
            weights.restore(directory)
            optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state)
    return state
