"""Peak memory of a piece of work (a PPO job, a benchmark) against one copy of the base weights.

On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, the
number that decides an out-of-memory). On the CPU: the process's peak resident set size (``VmHWM``)
minus the RSS when measuring started. Linux lets a process reset its own peak RSS (writing ``5`` to
``/proc/self/clear_refs``); where it cannot, the peak is the process's lifetime peak and the delta
can include earlier work. Memory a previous job freed but the allocator kept counts in the baseline,
so in a long-lived worker the CPU delta is a lower bound; ``bench/ppo_memory.py`` measures in a fresh
process. The reset is the same one ``workers.memory`` does when a job starts (the per-step
``memory/host_peak_rss_bytes`` reads the same ``VmHWM``): a PPO job repeats it just before loading.
Weights loaded from safetensors are memory-mapped and enter the RSS as they are first read, so the
RSS right after loading can be far below one base copy; the peak includes them.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


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


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMeter:
    """``start()`` before loading anything; ``peak()`` any time after."""

    device: torch.device
    baseline: int = 0
    peak_resettable: bool = True

    def start(self) -> PeakMeter:
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
        if self.device.type == "cuda":
            return max(0, torch.cuda.memory_allocated(self.device) - self.baseline)
        return max(0, current_rss() - self.baseline)

    def peak(self) -> int:
        """Peak bytes above the baseline since ``start()``."""
        if self.device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        return max(0, peak_rss() - self.baseline)

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        return "peak_rss_delta" if self.peak_resettable else "lifetime_peak_rss_delta"


