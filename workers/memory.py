"""Peak memory of the running job, sampled at every reported step (see ``workers.reporting``).

- ``memory/host_peak_rss_bytes``: the kernel's high-water mark of resident memory (``VmHWM``),
  reset when the job starts by writing ``5`` to ``/proc/self/clear_refs`` (a Celery pool process
  runs many jobs, so its lifetime peak would belong to an earlier one). Where that reset is refused,
  the peak of the RSS sampled at each report is used instead.
- ``memory/gpu_peak_allocated_bytes/<device>``: ``torch.cuda.max_memory_allocated`` per CUDA device
  this process has used, reset when the job starts. torch is only looked at when the recipe has
  already imported it.

``service.metrics`` maps them to ``alignd_job_host_memory_bytes`` and ``alignd_job_gpu_memory_bytes``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psutil

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


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Created when a job starts (resets the peaks); ``sample()`` at each step."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._hwm_reset = False
        self._sampled = 0
        self.reset()

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._sampled = self._process.memory_info().rss
        cuda = _cuda()
        if cuda is not None:
            for index in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(index)

    def sample(self) -> dict[str, float]:
        self._sampled = max(self._sampled, self._process.memory_info().rss)
        peak = max(self._sampled, (_vm_hwm() or 0) if self._hwm_reset else 0)
        values = {HOST_PEAK_RSS: float(peak)}
        cuda = _cuda()
        if cuda is not None:
            for index in range(cuda.device_count()):
                allocated = cuda.max_memory_allocated(index)
                if allocated:
                    values[f"{GPU_PEAK_PREFIX}cuda:{index}"] = float(allocated)
        return values
