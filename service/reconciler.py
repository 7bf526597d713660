"""The database is the truth: re-enqueue jobs the broker lost and recover jobs whose worker died.

One leader at a time (a PostgreSQL advisory lock, or a file lock next to the SQLite database) runs
``reconcile_once`` every few seconds inside the API process:

- a ``running`` job whose heartbeat is older than ``heartbeat_timeout`` lost its worker: it goes
  back to ``queued`` (it will resume from its latest checkpoint) until ``max_restarts``, then fails
  with ``worker_lost``;
- ``queued`` jobs beyond what the broker holds (after a Redis flush, a lost publish) are published
  again, oldest first. A duplicate message is harmless: the task's claim lets one delivery run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from service.db.engine import session_scope
from service.db.models import Job, JobEvent, now
from service.queue import queue_depth, send_train
from service.state import AppState

log = logging.getLogger("alignd.reconciler")
ADVISORY_LOCK_KEY = 0x616C69676E64  # "alignd"


@dataclass(frozen=True)
class ReconcilerSettings:
    interval: float = 10.0
    heartbeat_timeout: float = 120.0
    requeue_after: float = 30.0
    max_restarts: int = 3

    @classmethod
    def from_env(cls) -> ReconcilerSettings:
        def number(name: str, default: float) -> float:
            return float(os.environ.get(name) or default)

        return cls(interval=number("ALIGND_RECONCILE_INTERVAL", 10.0),
                   heartbeat_timeout=number("ALIGND_HEARTBEAT_TIMEOUT", 120.0),
                   requeue_after=number("ALIGND_REQUEUE_AFTER", 30.0),
                   max_restarts=int(number("ALIGND_MAX_RESTARTS", 3)))


def recover_orphans(state: AppState, cfg: ReconcilerSettings) -> dict[str, int]:
    recovered = failed = 0
    cutoff = now() - cfg.heartbeat_timeout
    with session_scope(state.sessions) as session:
        stale = session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
                                .with_for_update(skip_locked=True)).all()
        for job in stale:
            if job.restarts >= cfg.max_restarts:
                job.status, job.finished_at = "failed", now()
                job.error = {"code": "worker_lost", "param": None,
                             "message": f"the worker running this job stopped answering {job.restarts + 1} times; "
                                        f"gave up after {cfg.max_restarts} restarts"}
                session.add(JobEvent(job_id=job.id, level="error", message=f"Job failed: {job.error['message']}",
                                     data={"code": "worker_lost"}))
                failed += 1
            else:
                job.restarts += 1
                job.status, job.enqueued_at = "queued", None
                session.add(JobEvent(job_id=job.id, level="warn",
                                     message=f"Worker lost (no heartbeat for {cfg.heartbeat_timeout:.0f} s); "
                                             f"re-queued to resume from the latest checkpoint "
                                             f"(restart {job.restarts} of {cfg.max_restarts})"))
                recovered += 1
    return {"recovered": recovered, "failed": failed}


def republish_queued(state: AppState, cfg: ReconcilerSettings) -> int:
    depth = queue_depth(state.celery, state.settings)
    if depth is None:
        return 0
    with session_scope(state.sessions) as session:
        queued = session.scalars(select(Job).where(Job.status == "queued").order_by(Job.created_at)).all()
        missing = len(queued) - depth
        if missing <= 0:
            return 0
        cutoff = now() - cfg.requeue_after
        due = [j for j in queued if j.enqueued_at is None or j.enqueued_at < cutoff][:missing]
        ids = [(j.id, j.queue) for j in due]  # each to the queue it was routed to
        for job in due:
            job.enqueued_at = now()
    sent = sum(send_train(state.celery, state.settings, job_id, queue) for job_id, queue in ids)
    if sent:
        log.info("re-published %d queued job(s) the broker did not hold", sent)
    return sent


def reconcile_once(state: AppState, cfg: ReconcilerSettings) -> dict[str, int]:
    report = recover_orphans(state, cfg)
    report["republished"] = republish_queued(state, cfg)
    return report


class Leadership:
    """Held by one process at a time; others keep trying on each tick."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._conn: Any = None
        self._file: Any = None

    def acquire(self) -> bool:
        if self._conn is not None or self._file is not None:
            return True
        if self.state.settings.database.is_sqlite:
            path = Path(self.state.settings.data_dir) / "reconciler.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = path.open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                return False
            self._file = handle
            return True
        conn = self.state.engine.connect()
        acquired = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY}).scalar())
        conn.commit()  # the lock is session-level; do not sit idle in a transaction
        if acquired:
            self._conn = conn
            return True
        conn.close()
        return False

    def release(self) -> None:
        if self._conn is not None:
            try:  # pooled connections outlive close(): unlock explicitly
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None
        if self._file is not None:
            self._file.close()
            self._file = None


class Reconciler:
    def __init__(self, state: AppState, cfg: ReconcilerSettings | None = None) -> None:
        self.state = state
        self.cfg = cfg or ReconcilerSettings.from_env()
        self.leadership = Leadership(state)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alignd-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.interval + 5)
        self.leadership.release()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval):
            try:
                if self.leadership.acquire():
                    report = reconcile_once(self.state, self.cfg)
                    if any(report.values()):
                        log.info("reconciler: %s", report)
            except Exception:  # noqa: BLE001 - keep reconciling after a transient DB/broker error
                log.exception("reconciler pass failed")
                self.leadership.release()
