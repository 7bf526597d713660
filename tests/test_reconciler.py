"""The reconciler: a Redis flush loses no job, dead workers' jobs are re-queued then failed, one leader."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from service.db.engine import session_scope
from service.db.models import Job, now
from service.queue import queue_depth
from service.reconciler import Leadership, ReconcilerSettings, reconcile_once
from service.settings import Settings
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, _api, jsonl
from tests.processes import celery_worker, wait_for_job

REDIS_DB = 5
FAST = ReconcilerSettings(interval=0.1, heartbeat_timeout=5, requeue_after=0, max_restarts=2)


def _job(api: Api, headers: dict[str, str]) -> dict[str, object]:
    f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={
        "model": "tiny-random-llama", "training_file": f["id"],
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"max_steps": 2, "batch_size": 4}}}})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_redis_flush_while_queued_still_runs(tmp_path: Path, postgres_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_DATABASE_URL": postgres_url,
           "ALIGND_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
           "ALIGND_QUEUE": "alignd-flush-" + secrets.token_hex(4), "ALIGND_MODEL_CACHE": str(MODEL_CACHE)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    gen = _api(settings)
    api = next(gen)
    try:
        headers = api.key("acme")
        job = _job(api, headers)
        assert queue_depth(api.state.celery, settings) == 1
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
        assert queue_depth(api.state.celery, settings) == 0
        report = reconcile_once(api.state, FAST)
        assert report["republished"] == 1 and queue_depth(api.state.celery, settings) == 1
        assert reconcile_once(api.state, FAST)["republished"] == 0  # the broker holds it now: no duplicate
        with celery_worker(settings, env, tmp_path / "worker.log"):
            done = wait_for_job(lambda p: api.client.get(p, headers=headers), str(job["id"]), timeout=180)
        assert done["status"] == "succeeded"
    finally:
        next(gen, None)


def test_dead_worker_job_is_requeued_then_failed_after_max_restarts(api: Api) -> None:
    headers = api.key("acme")
    job_id = str(_job(api, headers)["id"])
    for attempt in range(1, FAST.max_restarts + 2):
        with session_scope(api.state.sessions) as s:  # a worker claimed it, then went silent
            s.execute(update(Job).where(Job.id == job_id).values(status="running", heartbeat_at=now() - 60))
        report = reconcile_once(api.state, FAST)
        job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
        if attempt <= FAST.max_restarts:
            assert report["recovered"] == 1 and job["status"] == "queued"
        else:
            assert report["failed"] == 1 and job["status"] == "failed"
            assert job["error"]["code"] == "worker_lost"
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=50", headers=headers).json()["data"]
    assert sum("Worker lost" in e["message"] for e in events) == FAST.max_restarts
    assert events[0]["level"] == "error"


def test_fresh_heartbeat_is_left_alone(api: Api) -> None:
    headers = api.key("acme")
    job_id = str(_job(api, headers)["id"])
    with session_scope(api.state.sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="running", heartbeat_at=now()))
    assert reconcile_once(api.state, FAST)["recovered"] == 0


def test_one_leader_at_a_time(api: Api) -> None:
    first, second = Leadership(api.state), Leadership(api.state)
    assert first.acquire() is True
    assert second.acquire() is False
    first.release()
    assert second.acquire() is True
    second.release()
