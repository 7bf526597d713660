"""The worker's process model: every job in a fresh process, forked from a main process without CUDA.

Two jobs in a row on one real worker (``alignd worker``'s command line, the ``live`` fixture) must run
in two different processes that are both children of the same main process, each gone once its job
ended; the main process preloaded torch (its memory map has ``libtorch``: jobs fork warm) and never
initialised CUDA. ``workers.process_model``'s run-time guard is checked in subprocesses of its own.
On CUDA (``-m gpu``) the second job's process must start with no GPU memory allocated.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, LiveService

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}."} for a in range(1, 5) for b in (1, 2)]


def _sft(file_id: str) -> dict[str, Any]:
    return {"model": "tiny-random-llama", "training_file": file_id, "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": 4, "max_length": 128, "max_steps": 1}}}}


def _process_facts(live: LiveService, job_id: str) -> dict[str, Any]:
    events = live.get(f"/v1/fine_tuning/jobs/{job_id}/events?order=asc&limit=100").json()["data"]
    facts = [e["data"] for e in events if e["message"].startswith("Training process ")]
    assert len(facts) == 1, [e["message"] for e in events]
    return dict(facts[0])


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_two_jobs_in_a_row_run_in_two_fresh_processes(live: LiveService) -> None:
    file_id = live.upload(ROWS, "sft.jsonl")["id"]
    first = live.run(_sft(file_id), timeout=240)
    second = live.run(_sft(file_id), timeout=240)  # a process that refuses a second job leaves it queued
    assert first["status"] == second["status"] == "succeeded", (first.get("error"), second.get("error"))
    a, b = _process_facts(live, first["id"]), _process_facts(live, second["id"])
    assert a["pid"] != b["pid"]  # the second job did not reuse the first one's process
    assert a["parent_pid"] == b["parent_pid"]  # ... yet both ran under the same worker
    assert a["worker"] == b["worker"]
    assert _gone(a["pid"]) and _gone(b["pid"])  # each job's process exited with its job
    maps = Path(f"/proc/{a['parent_pid']}/maps").read_text()
    assert "libtorch" in maps  # the main process preloaded the training stack: each job forks warm
    assert a["parent_cuda_initialized"] is False and b["parent_cuda_initialized"] is False


def _guard(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_guard_refuses_a_second_job_and_a_parent_that_initialised_cuda() -> None:
    ok = _guard("from workers import process_model as p\np.note_fork()\np.ensure_fresh_process()\nprint('ran')")
    assert ok.returncode == 0 and "ran" in ok.stdout, ok.stderr
    again = _guard("from workers import process_model as p\np.note_fork()\np.ensure_fresh_process()\n"
                   "p.ensure_fresh_process()")
    assert again.returncode != 0 and "already ran a job" in again.stderr
    torch_only = _guard("import torch\nfrom workers import process_model as p\np.note_fork()\n"
                        "p.ensure_fresh_process()\nprint('ran')")
    assert torch_only.returncode == 0 and "ran" in torch_only.stdout, torch_only.stderr  # importing is fine
    # a parent that initialised CUDA (this CPU machine has none: torch's own flag stands in for it)
    cuda_first = _guard("import torch\ntorch.cuda.is_initialized = lambda: True\n"
                        "from workers import process_model as p\np.note_fork()\np.ensure_fresh_process()")
    assert cuda_first.returncode != 0 and "initialised CUDA" in cuda_first.stderr


def test_the_preload_imports_the_training_stack_without_initialising_cuda() -> None:
    script = ("import sys\nimport workers.celery_app, workers.tasks\nfrom workers import process_model as p\n"
              "before = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
              "p.preload_training_stack()\n"
              "after = sorted(m for m in ('torch', 'transformers', 'peft', 'workers.recipes.dpo', "
              "'workers.recipes.rl.reinforcement') if m in sys.modules)\n"
              "print(before, after, p.cuda_initialized())")
    out = _guard(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[] ['peft', 'torch', 'transformers', 'workers.recipes.dpo', "
                                  "'workers.recipes.rl.reinforcement'] False")


@pytest.mark.gpu
def test_on_cuda_the_second_job_starts_with_no_gpu_memory(live: LiveService) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    file_id = live.upload(ROWS, "sft.jsonl")["id"]
    jobs = [live.run(_sft(file_id)) for _ in range(2)]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    second = _process_facts(live, jobs[1]["id"])["cuda_memory_at_start"]
    assert second == {"allocated": 0, "max_allocated": 0, "reserved": 0}
