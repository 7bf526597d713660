"""One fresh process per job, forked from a main process that never initialised CUDA.

CUDA does not survive a ``fork``: a child forked from a process that initialised CUDA cannot use the
GPU, and a process that ran one job keeps that job's cached GPU memory (and its allocator's
fragmentation) for the next. So the worker runs Celery's prefork pool with
``worker_max_tasks_per_child=1`` (``service.queue.make_celery``): the main process only receives
messages and forks; each job runs in a new pool process, which exits when the job ends and so hands
every byte of host and GPU memory back to the system. The next job gets a new process whose CUDA
state starts empty.

Importing torch is not initialising CUDA (that happens on the first ``torch.cuda`` call that needs a
device), and a fork after the import is what PyTorch's own DataLoader workers do. So the main process
*preloads* the training stack at start-up (:func:`preload_training_stack`, on ``worker_init``): each
job's process is forked warm instead of spending seconds importing torch, transformers and peft
again. What the main process must never do is touch CUDA; this module enforces it at run time:

* :func:`note_fork` runs in every pool process right after the fork (``worker_process_init``) and
  records whether the main process had initialised CUDA (torch's state is inherited by the fork);
* :func:`ensure_fresh_process` runs at the start of every ``alignd.train`` task and refuses (raises
  :class:`ProcessModelError`) to run a job in a process forked from a parent that initialised CUDA, or
  in a process that already ran a job (``worker_max_tasks_per_child`` not 1). The message then is
  not acked as done: the job stays ``queued`` in the database and the reconciler re-publishes it;
* :func:`job_process_facts` is what the job's "Training process" event records: the process id (tests
  compare two jobs' ids), the parent's, and, on CUDA, the memory the new process starts with.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery.signals import worker_init, worker_process_init

#: Set in each pool process right after the fork: the main process had initialised CUDA.
_inherited_cuda: bool | None = None
_jobs_run = 0


class ProcessModelError(RuntimeError):
    """The process a job was about to run in is not a fresh child of a CUDA-free main process."""


def cuda_initialized() -> bool:
    """Whether this process (or, right after a fork, its parent) initialised CUDA; never initialises it."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@worker_init.connect
def preload_training_stack(**_: Any) -> None:
    """In the main process, before the pool forks: import torch, transformers, peft and every recipe
    (no CUDA call), so that each job's fresh process starts with them loaded."""
    import importlib

    from workers.recipes import RECIPES

    for target in RECIPES.values():
        importlib.import_module(target.partition(":")[0])


@worker_process_init.connect
def note_fork(**_: Any) -> None:
    """In a new pool process, before it runs anything: what it inherited from the main process."""
    global _inherited_cuda, _jobs_run
    _inherited_cuda = cuda_initialized()
    _jobs_run = 0


def ensure_fresh_process() -> None:
    """Raise unless this pool process is new and its parent never initialised CUDA (module docstring)."""
    global _jobs_run
    if _inherited_cuda:
        raise ProcessModelError(
            "the worker's main process initialised CUDA before forking this job's process; CUDA does not "
            "work in a forked child. Something the worker runs at start-up touches torch.cuda: make it lazy")
    if _jobs_run:
        raise ProcessModelError(
            f"process {os.getpid()} already ran a job; every job needs a fresh process "
            "(worker_max_tasks_per_child=1 with the prefork pool)")
    _jobs_run += 1


def job_process_facts(*, cuda: bool = True) -> dict[str, Any]:
    """The training process's id and parent, and (``cuda``, on a GPU worker) its CUDA memory at job start.

    Initialising CUDA here is fine: this is the job's own process, which is about to use the GPU."""
    facts: dict[str, Any] = {"pid": os.getpid(), "parent_pid": os.getppid(),
                             "parent_cuda_initialized": bool(_inherited_cuda)}
    if not cuda:
        return facts
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
        facts["cuda_memory_at_start"] = {"allocated": int(torch.cuda.memory_allocated()),
                                         "max_allocated": int(torch.cuda.max_memory_allocated()),
                                         "reserved": int(torch.cuda.memory_reserved())}
    return facts


__all__ = ["ProcessModelError", "cuda_initialized", "ensure_fresh_process", "job_process_facts", "note_fork",
           "preload_training_stack"]
