"""Memory: the peak of the running job, and the peak of a piece of work against one copy of the base.

Per job (sampled at every reported step, see ``workers.reporting``):

- ``memory/host_peak_rss_bytes``: the kernel's high-water mark of resident memory (``VmHWM``),
  reset when the job starts by writing ``5`` to ``/proc/self/clear_refs`` (each job has a fresh pool
  process, ``workers.process_model``, but the process's imports before the job are not
  the job's). Where that reset is refused, the peak of the RSS sampled at each report is used instead.
- ``memory/gpu_peak_allocated_bytes/<device>``: ``torch.cuda.max_memory_allocated`` per CUDA device
  this process has used, reset when the job starts. torch is only looked at when the recipe has
  already imported it.

``service.metrics`` maps them to ``alignd_job_host_memory_bytes`` and ``alignd_job_gpu_memory_bytes``.

Per piece of work (:class:`PeakMeter`, used by PPO's memory report and ``bench/``): on CUDA,
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, the number that
decides an out-of-memory); on the CPU, the peak RSS (``VmHWM``) minus the RSS when measuring started.
Memory a previous job freed but the allocator kept counts in the baseline, so in a long-lived worker
the CPU delta is a lower bound; ``bench/ppo_memory.py`` measures in a fresh process. Weights loaded
from safetensors are memory-mapped and enter the RSS as they are first read, so the RSS right after
loading can be far below one base copy; the peak includes them.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    import torch
    from torch import nn

HOST_PEAK_RSS = "memory/host_peak_rss_bytes"
GPU_PEAK_PREFIX = "memory/gpu_peak_allocated_bytes/"  # + device, e.g. "cuda:0"


def _cuda() -> Any | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """``VmHWM`` (resettable, see :func:`reset_peak_rss`), else the lifetime ``ru_maxrss``."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Created when a job starts (resets the peaks); ``sample()`` at each step."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._hwm_reset = False
        self._sampled = 0
        self.reset()

    def reset(self) -> None:
        self._hwm_reset = reset_peak_rss()
        self._sampled = self._process.memory_info().rss
        cuda = _cuda()
        if cuda is not None:
            for index in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(index)

    def sample(self) -> dict[str, float]:
        self._sampled = max(self._sampled, self._process.memory_info().rss)
        peak = max(self._sampled, peak_rss() if self._hwm_reset else 0)
        values = {HOST_PEAK_RSS: float(peak)}
        cuda = _cuda()
        if cuda is not None:
            for index in range(cuda.device_count()):
                allocated = cuda.max_memory_allocated(index)
                if allocated:
                    values[f"{GPU_PEAK_PREFIX}cuda:{index}"] = float(allocated)
        return values


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once (tied weights too)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def parameter_count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


@dataclass
class PeakMeter:
    """``start()`` before loading anything; ``peak()`` any time after."""

    device: torch.device
    baseline: int = 0
    peak_resettable: bool = True

    def start(self) -> PeakMeter:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_resettable = reset_peak_rss()
            self.baseline = current_rss()
        return self

    def current(self) -> int:
        """Bytes above the baseline now (allocated tensors on CUDA, RSS on the CPU)."""
        import torch

        if self.device.type == "cuda":
            return max(0, torch.cuda.memory_allocated(self.device) - self.baseline)
        return max(0, current_rss() - self.baseline)

    def peak(self) -> int:
        """Peak bytes above the baseline since ``start()``."""
        import torch

        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        return max(0, peak_rss() - self.baseline)

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        return "peak_rss_delta" if self.peak_resettable else "lifetime_peak_rss_delta"


