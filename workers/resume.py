"""Checkpoints that a job resumes from: weights plus the whole training state.

A checkpoint archive holds the model files (adapter or full weights) and ``training_state.pt``:
optimizer and scheduler state, the RNG states, the step, the tokens seen and the last metrics. The
data-loader position is implied by the step, because batches are planned deterministically from
the job's seed. The archive is one object and its database row is written after the upload, so a
checkpoint is either complete or invisible. ``training_state.pt`` is written by the worker itself
and read with ``weights_only=True``: no pickled code is ever executed.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from workers.checkpointing import fetch_adapter

STATE_FILE = "training_state.pt"


def capture_state(*, step: int, tokens: int, metrics: dict[str, float], optimizer: Any,
                  scheduler: Any) -> dict[str, Any]:
    return {
        "step": step,
        "tokens": tokens,
        "metrics": dict(metrics),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": _python_rng_as_tensor(),
    }


def write_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, directory / STATE_FILE)


def _python_rng_as_tensor() -> torch.Tensor:
    version, internal, gauss = random.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)


def _restore_python_rng(value: torch.Tensor) -> None:
    items = value.tolist()
    random.setstate((items[0], tuple(items[1:-1]), None))


def _find(model: nn.Module, kind: type) -> Any:
    for module in model.modules():
        if isinstance(module, kind):
            return module
    return None


def restore_weights(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's weights into the live (possibly wrapped) model, in place."""
    peft_model = _find(model, PeftModel)
    if peft_model is not None:
        weights = load_file(str(directory / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(peft_model, weights)
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


def load_resume_point(store: Any, key: str, model: nn.Module, optimizer: Any, scheduler: Any,
                      workdir: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint archive; returns its state."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        directory = fetch_adapter(store, key, Path(tmp) / "checkpoint")
        restore_weights(model, directory)
        state: dict[str, Any] = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    _restore_python_rng(state["python_rng"])
    return state
