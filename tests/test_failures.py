"""Failures explain themselves: an out-of-memory error names the estimate and the device's memory."""

from __future__ import annotations

import torch

from service.db.engine import session_scope
from service.db.models import Job
from tests.conftest import Api
from workers.runner import is_out_of_memory, out_of_memory_error
from workers.tasks import worker_state


def test_out_of_memory_error_is_actionable(sqlite_api: Api) -> None:
    api = sqlite_api
    headers = api.key("acme")
    line = b'{"prompt":"a","chosen":"b","rejected":"c"}\n'
    f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", line)},
                        data={"purpose": "fine-tune"}).json()
    job = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={
        "model": "tiny-random-llama", "training_file": f["id"], "method": {"type": "dpo"}}).json()
    assert job["estimated_memory_bytes"] > 0
    error = out_of_memory_error(worker_state(api.state.settings), job["id"])
    assert error["code"] == "out_of_memory"
    assert "estimated to need" in error["message"] and "GiB" in error["message"]
    assert "dry_run" in error["message"] and "Traceback" not in error["message"]
    with session_scope(api.state.sessions) as s:
        assert s.get(Job, job["id"]) is not None


def test_out_of_memory_is_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))
    assert not is_out_of_memory(ValueError("shapes do not match"))
