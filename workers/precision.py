"""The one place that decides numeric precision for a device: stored weights, autocast, loss scaling.

Why one module: the rules used to sit in ``workers.modeling`` (dtypes), ``workers.loop`` (accelerate's
``mixed_precision``) and accelerate itself (its fp16 scaler), which made an fp16 run's loss scaling
invisible to our checkpoints (a resumed fp16 job restarted at scale 65536 and skipped its first
updates again) and untestable on the CPU, where accelerate refuses fp16.

Rules (:func:`choose_precision`)
- CUDA with bf16 (compute capability >= 8): bf16 autocast. LoRA keeps the frozen base in bf16; a full
  fine-tune keeps fp32 master weights (the optimizer updates fp32, so small updates are not rounded
  away). No loss scaler: bf16 has fp32's exponent range.
- CUDA without bf16 (compute capability < 8: V100, T4): fp16 autocast, fp32 weights (an fp16 frozen
  base overflows too easily) and a loss scaler (:func:`grad_scaler`, ``torch.amp.GradScaler``): fp16
  gradients underflow below 6e-8 without one. ``workers.loop`` owns it: it scales the loss, unscales
  before clipping, skips an update whose gradients hold inf/NaN (the scale then halves) and saves the
  scaler's state in every checkpoint.
- CPU: fp32, no autocast (CPU half-precision matmuls are slow). ``ALIGND_MIXED_PRECISION=bf16|fp16``
  forces a mode anywhere (tests check the GPU rules on the CPU with it).
- LoRA weights are fp32 whatever the base's dtype (peft's ``autocast_adapter_dtype``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from service.jobs.spec import LoraTraining, TrainingType

MixedPrecision = Literal["no", "bf16", "fp16"]
FORCE_ENV = "ALIGND_MIXED_PRECISION"


@dataclass(frozen=True)
class Precision:
    """``weights``: the dtype parameters are stored in; ``mixed``: the autocast mode ("no": none)."""

    weights: torch.dtype
    mixed: MixedPrecision

    @property
    def compute(self) -> torch.dtype:
        """The dtype matmuls run in."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed, self.weights)

    @property
    def needs_scaler(self) -> bool:
        """fp16 autocast: gradients need a loss scaler (bf16's exponent range does not)."""
        return self.mixed == "fp16"


def bf16_supported(device_type: str) -> bool:
    """CUDA bf16 needs compute capability 8 (Ampere) or newer; emulated bf16 on older cards is slow."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8 and torch.cuda.is_bf16_supported()


def choose_precision(training_type: TrainingType, device_type: str | None = None) -> Precision:
    """The precision for ``training_type`` on ``device_type`` (default: CUDA when present), see the module doc."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    full = not isinstance(training_type, LoraTraining)
    forced = os.environ.get(FORCE_ENV)
    if forced in ("bf16", "fp16"):
        mixed: MixedPrecision = forced  # type: ignore[assignment]
    elif device_type == "cuda":
        mixed = "bf16" if bf16_supported(device_type) else "fp16"
    else:
        return Precision(torch.float32, "no")
    half = torch.bfloat16 if mixed == "bf16" else torch.float16
    # fp16 frozen bases overflow too easily; only bf16 stores the frozen LoRA base in half precision
    stored = torch.float32 if full or mixed == "fp16" or device_type != "cuda" else half
    return Precision(stored, mixed)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 autocast (any device: ``torch.amp.GradScaler`` runs on the CPU too), else None."""
    if not precision.needs_scaler:
        return None
    return torch.amp.GradScaler(device.type)


@contextlib.contextmanager
def autocast(precision: Precision, device_type: str) -> Iterator[None]:
    """``torch.autocast`` in the compute dtype, or nothing for fp32."""
    if precision.mixed == "no":
        yield
        return
    with torch.autocast(device_type=device_type, dtype=precision.compute):
        yield


__all__ = ["FORCE_ENV", "MixedPrecision", "Precision", "autocast", "bf16_supported", "choose_precision",
           "grad_scaler"]
