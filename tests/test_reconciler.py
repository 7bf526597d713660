"""The reconciler: a Redis flush loses no job, dead workers' jobs are re-queued then failed, one leader."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, text, update

from service.db.engine import session_scope
from service.db.models import Job, now
from service.queue import queue_depth, queue_depths, send_train
from service.reconciler import Leadership, ReconcilerSettings, reconcile_once
from service.settings import DatabaseSettings, Settings
from service.state import AppState
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, _api, jsonl, make_settings
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


def test_republish_counts_each_queue_and_takes_the_longest_unpublished(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Queue A holds 2 messages for its 3 queued jobs, queue B none for its 1. Counted across queues, a
    surplus elsewhere could hide B's lost publish; per queue, A's longest-unpublished job (oldest
    ``enqueued_at``) and B's job are published again, and nothing else."""
    token = secrets.token_hex(4)
    qa, qb = f"alignd-qa-{token}", f"alignd-qb-{token}"
    env = {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
           "ALIGND_QUEUES": f"{qa}=unlimited,{qb}=unlimited", "ALIGND_MODEL_CACHE": str(MODEL_CACHE)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    gen = _api(settings)
    api = next(gen)
    try:
        headers = api.key("acme")
        a1, a2, a3, b1 = (str(_job(api, headers)["id"]) for _ in range(4))
        t = now()
        with session_scope(api.state.sessions) as s:
            for job_id, queue, published in ((a1, qa, t - 300), (a2, qa, t - 100), (a3, qa, t - 200),
                                             (b1, qb, t - 50)):
                s.execute(update(Job).where(Job.id == job_id).values(queue=queue, enqueued_at=published))
        r = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        r.delete(qa, qb)
        for _ in range(2):  # A: two messages (one of them a duplicate); B: its publish was lost
            send_train(api.state.celery, settings, a2, qa)
        assert queue_depths(api.state.celery, settings) == {qa: 2, qb: 0}
        report = reconcile_once(api.state, FAST)
        assert report["republished"] == 2
        assert queue_depths(api.state.celery, settings) == {qa: 3, qb: 1}
        with session_scope(api.state.sessions) as s:
            published = dict(s.execute(select(Job.id, Job.enqueued_at).where(Job.id.in_([a1, a2, a3, b1]))).all())
        assert published[a1] > t - 10 and published[b1] > t - 10  # A's longest-unpublished, and B's
        assert published[a2] == pytest.approx(t - 100) and published[a3] == pytest.approx(t - 200)
        assert reconcile_once(api.state, FAST)["republished"] == 0
        r.delete(qa, qb)
    finally:
        next(gen, None)


def test_a_postgres_leader_whose_connection_dropped_steps_down(postgres_url: str, tmp_path: Path) -> None:
    state = AppState(make_settings(tmp_path, postgres_url))
    first, second = Leadership(state), Leadership(state)
    try:
        assert first.acquire() is True
        pid = first._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        first._conn.commit()
        with state.engine.connect() as admin:  # the network drops the leader's session
            assert admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar() is True
            admin.commit()
        time.sleep(0.5)
        assert second.acquire() is True  # the lock went with the session
        assert first.acquire() is False  # re-verified, not assumed: one leader
        second.release()
        assert first.acquire() is True
    finally:
        first.release()
        second.release()
        state.engine.dispose()


def test_the_sqlite_lock_file_lives_next_to_the_database(tmp_path: Path) -> None:
    """Two API processes with different data dirs but one database file: still one leader."""
    database = DatabaseSettings(f"sqlite:///{tmp_path / 'shared' / 'alignd.db'}")
    first = Leadership(AppState(replace(make_settings(tmp_path / "a"), database=database)))
    second = Leadership(AppState(replace(make_settings(tmp_path / "b"), database=database)))
    assert first.acquire() is True
    assert second.acquire() is False
    assert first.lock_path() == tmp_path / "shared" / "alignd.db.reconciler.lock" and first.lock_path().exists()
    first.release()
    assert second.acquire() is True
    second.release()
