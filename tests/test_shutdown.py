"""Graceful shutdown and preemption, with real processes.

- SIGTERM to ``alignd serve``: the API stops, its worker hands the running job back as ``queued`` and
  exits, and no process of the group is left.
- SIGTERM to a worker's main process mid-job (what Kubernetes sends a pod), on production parts: the
  job checkpoints at its next step boundary, goes back to ``queued`` under the same id with an event
  that says why, and another worker resumes at that step and finishes it: every step once, none lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from service.db.engine import session_scope
from service.db.models import Job
from service.state import AppState
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, jsonl, make_settings
from tests.processes import alignd, celery_worker, free_port, wait_for_job, wait_http

GRACE = 60.0


def long_dpo(file_id: str, steps: int) -> dict[str, Any]:
    return {"model": "tiny-random-llama", "training_file": file_id, "seed": 2,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "batch_size": 2, "max_steps": steps, "n_epochs": 100, "checkpoint_every_steps": 1000,
                "learning_rate": 5e-4}}}}


def group_alive(pgid: int) -> list[str]:
    alive = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.info['name']}")
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def messages(get: Any, job_id: str) -> list[dict[str, Any]]:
    return get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=500&order=asc").json()["data"]  # type: ignore[no-any-return]


def test_sigterm_to_serve_hands_the_job_back_and_leaves_no_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
            "ALIGND_WORKER_SHUTDOWN_GRACE": str(GRACE)}
    key = alignd("keys", "create", "--org", "acme", env=env).strip()
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "serve", "--port", str(port)],
                                 env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        f = client.post("/v1/files", files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
        job = client.post("/v1/fine_tuning/jobs", json=long_dpo(f["id"], 100000)).json()
        deadline = time.time() + 240
        while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 2:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        tree = psutil.Process(serve.pid).children(recursive=True)
        assert len(tree) >= 2  # the worker's main process and its pool process
        began = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=GRACE + 20)
        took = time.monotonic() - began
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    assert serve.returncode == 0, log.read_text()[-3000:]
    assert took < GRACE
    time.sleep(0.5)
    assert group_alive(serve.pid) == [], log.read_text()[-3000:]
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # the worker handed the job back: queued again, with an event that says why
    state = AppState(make_settings(tmp_path / "data"))
    with session_scope(state.sessions) as s:
        row = s.get(Job, job["id"])
        assert row is not None and row.status == "queued" and row.worker is None and not row.preempt_requested, \
            log.read_text()[-3000:]
    events = [m.message for m in _events(state, job["id"])]
    assert any(m.startswith("Worker shutting down: checkpointed at step") for m in events), events[-5:]
    state.engine.dispose()


def _events(state: AppState, job_id: str) -> list[Any]:
    from sqlalchemy import select

    from service.db.models import JobEvent

    with session_scope(state.sessions) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def test_sigterm_to_a_worker_mid_job_hands_it_to_another_worker(production, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env, settings, api = production
    env = env | {"ALIGND_WORKER_SHUTDOWN_GRACE": str(GRACE)}
    api_: Api = api
    headers = api_.key("acme")
    get = lambda p: api_.client.get(p, headers=headers)  # noqa: E731
    steps = 30
    f = api_.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                         data={"purpose": "fine-tune"}).json()
    job_id = api_.client.post("/v1/fine_tuning/jobs", headers=headers, json=long_dpo(f["id"], steps)).json()["id"]
    with celery_worker(settings, env, tmp_path / "worker1.log") as worker1:
        deadline = time.time() + 240
        while get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["step"] < 3:
            assert time.time() < deadline, (tmp_path / "worker1.log").read_text()[-3000:]
            time.sleep(0.05)
        with celery_worker(settings, env, tmp_path / "worker2.log"):
            with session_scope(api_.state.sessions) as s:
                first = s.get(Job, job_id)
                assert first is not None
                first_worker, at_signal = first.worker, first.step
            began = time.monotonic()
            worker1.send_signal(signal.SIGTERM)  # the main process only, as the kubelet does
            assert worker1.wait(timeout=GRACE) == 0
            exited_after = time.monotonic() - began
            done = wait_for_job(get, job_id, timeout=300)
    assert done["status"] == "succeeded", (tmp_path / "worker2.log").read_text()[-3000:]
    assert exited_after < GRACE
    losses = get(f"/v1/fine_tuning/jobs/{job_id}/metrics?name=loss").json()["data"]
    assert [p["step"] for p in losses] == list(range(1, steps + 1))  # every step once
    events = messages(get, job_id)
    handed = [e for e in events if e["message"].startswith("Worker shutting down: checkpointed at step")]
    resumed = [e for e in events if e["message"].startswith("resumed from step")]
    assert len(handed) == 1 and len(resumed) == 1
    stopped_at = handed[0]["data"]["step"]
    assert resumed[0]["data"]["step"] == stopped_at  # the other worker resumes at that step
    assert stopped_at >= at_signal  # nothing trained before the signal is lost
    order = [e["message"] for e in events]
    assert order.index(handed[0]["message"]) < order.index(resumed[0]["message"])
    with session_scope(api_.state.sessions) as s:
        final = s.get(Job, job_id)
        assert final is not None and final.worker != first_worker and final.attempt == 2


def test_a_worker_whose_job_cannot_reach_a_step_boundary_hands_it_back_by_force(production,  # type: ignore[no-untyped-def]
                                                                                 tmp_path: Path) -> None:
    """The training process is frozen (a step longer than the grace period): at the deadline the main
    process re-queues the job with a new attempt (fencing the frozen process out), kills its pool and
    exits within the grace period; another worker finishes the job from its latest checkpoint."""
    env, settings, api = production
    grace = 25.0  # the forced hand-back comes at grace - 20 s
    env = env | {"ALIGND_WORKER_SHUTDOWN_GRACE": str(grace)}
    headers = api.key("acme")
    get = lambda p: api.client.get(p, headers=headers)  # noqa: E731
    steps = 12
    f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    body = long_dpo(f["id"], steps)
    body["method"]["dpo"]["hyperparameters"]["checkpoint_every_steps"] = 2
    job_id = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()["id"]
    with celery_worker(settings, env, tmp_path / "worker1.log") as worker1:
        deadline = time.time() + 240
        while not get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]:
            assert time.time() < deadline, (tmp_path / "worker1.log").read_text()[-3000:]
            time.sleep(0.05)
        pool = psutil.Process(worker1.pid).children(recursive=True)
        assert pool
        for child in pool:
            child.suspend()  # SIGSTOP: the job cannot reach its next step boundary
        began = time.monotonic()
        worker1.send_signal(signal.SIGTERM)
        worker1.wait(timeout=grace)
        exited_after = time.monotonic() - began
        assert not [p for p in pool if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert exited_after < grace
    with session_scope(api.state.sessions) as s:
        row = s.get(Job, job_id)
        assert row is not None and row.status == "queued" and row.attempt == 2 and row.worker is None
    events = [e["message"] for e in messages(get, job_id)]
    assert any("did not reach a step boundary within the grace period" in m for m in events)
    with celery_worker(settings, env, tmp_path / "worker2.log"):
        done = wait_for_job(get, job_id, timeout=300)
    assert done["status"] == "succeeded", (tmp_path / "worker2.log").read_text()[-3000:]
    losses = get(f"/v1/fine_tuning/jobs/{job_id}/metrics?name=loss").json()["data"]
    assert [p["step"] for p in losses] == list(range(1, steps + 1))
