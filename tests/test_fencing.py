"""No zombie writes: a worker frozen after a checkpoint, whose job the reconciler handed to another
worker, is fenced out when it wakes. Production parts: PostgreSQL, Redis, moto's S3 server, real
worker processes.

Worker 1 is frozen with SIGSTOP (its heartbeat stops, as when a node is cut off or paused), the
reconciler re-queues the job, worker 2 resumes it from the checkpoint; worker 1 is woken with SIGCONT
while worker 2 trains. Every write worker 1 still tries is refused: the job succeeds with every
step's loss recorded once, its final adapter is worker 2's, and worker 1 logs that it lost the job.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import select

from service.db.engine import session_scope
from service.db.models import Checkpoint, Job
from service.reconciler import ReconcilerSettings, reconcile_once
from tests.conftest import PREFERENCE_ROWS, Api, jsonl
from tests.processes import celery_worker, wait_for_job

STEPS = 24
BODY = {"model": "tiny-random-llama", "seed": 5,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {
            "batch_size": 2, "max_steps": STEPS, "n_epochs": 4, "checkpoint_every_steps": 4,
            "learning_rate": 5e-4}}}}
TAKEOVER = ReconcilerSettings(heartbeat_timeout=2.0, requeue_after=0, max_restarts=3)


def _job_row(api: Api, job_id: str) -> Job:
    with session_scope(api.state.sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_frozen_worker_is_fenced_out_when_it_wakes(production, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env, settings, api = production
    headers = api.key("acme")
    get = lambda p: api.client.get(p, headers=headers)  # noqa: E731
    f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    job_id = api.client.post("/v1/fine_tuning/jobs", headers=headers,
                             json={**BODY, "training_file": f["id"]}).json()["id"]
    log1, log2 = tmp_path / "worker1.log", tmp_path / "worker2.log"
    with celery_worker(settings, env, log1) as worker1:
        _wait(lambda: get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"], 240, "a checkpoint")
        os.killpg(worker1.pid, signal.SIGSTOP)  # main process and pool child: frozen, heartbeat too
        try:
            frozen = _job_row(api, job_id)
            assert frozen.status == "running" and frozen.step < STEPS
            first_attempt, first_worker = frozen.attempt, frozen.worker
            # The reconciler sees the silent heartbeat, re-queues the job (new attempt) and re-publishes
            # it (worker 1's message is unacknowledged, so the queue is empty).
            recovered = republished = 0
            deadline = time.time() + 90  # > the fenced-transaction timeout, should worker 1 have frozen in one
            while not (recovered and republished):
                assert time.time() < deadline, "the reconciler never handed the job over"
                time.sleep(0.5)
                report = reconcile_once(api.state, TAKEOVER)
                recovered += report["recovered"]
                republished += report["republished"]
            assert _job_row(api, job_id).attempt == first_attempt + 1
            with celery_worker(settings, env, log2):
                # worker 2 owns the job and has trained past the step worker 1 was frozen at
                _wait(lambda: (row := _job_row(api, job_id)).attempt == first_attempt + 2
                      and row.step > frozen.step + 1, 240, "worker 2 to train past worker 1's step")
                os.killpg(worker1.pid, signal.SIGCONT)
                done = wait_for_job(get, job_id, timeout=300)
                _wait(lambda: "lost the job" in log1.read_text(errors="replace"), 60, "worker 1's log line")
        finally:
            os.killpg(worker1.pid, signal.SIGCONT)
    assert done["status"] == "succeeded", log2.read_text(errors="replace")[-3000:]
    losses = get(f"/v1/fine_tuning/jobs/{job_id}/metrics?name=loss").json()["data"]
    assert [p["step"] for p in losses] == list(range(1, STEPS + 1))  # every step once: none from worker 1
    final = _job_row(api, job_id)
    second_attempt = first_attempt + 2
    assert final.worker != first_worker
    assert final.adapter_key == f"jobs/{job_id}/attempt_{second_attempt}/adapter.tar.gz"
    served = get(f"/v1/fine_tuning/jobs/{job_id}/adapter").content
    assert served == api.state.store.get_bytes(final.adapter_key)  # the adapter is worker 2's object
    with session_scope(api.state.sessions) as s:
        checkpoints = s.execute(select(Checkpoint.step_number, Checkpoint.storage_key)
                                .where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number)).all()
    resumed = [e["data"]["step"] for e in get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=500").json()["data"]
               if e["message"].startswith("resumed from step")]
    assert len(resumed) == 1
    for step, key in checkpoints:  # each row points at the attempt that was the owner when it was written
        owner = first_attempt if step <= resumed[0] else second_attempt
        assert key == f"jobs/{job_id}/attempt_{owner}/step_{step}/adapter.tar.gz", (step, key)
    # only the last three are kept (workers.selection: retention), the older rows and files deleted
    assert [step for step, _ in checkpoints] == list(range(4, STEPS + 1, 4))[-3:]
    assert not api.state.store.exists(f"jobs/{job_id}/attempt_{first_attempt}/step_4/adapter.tar.gz")
    text = log1.read_text(errors="replace")
    assert f"job {job_id}: this worker lost the job (attempt {first_attempt} was superseded)" in text
