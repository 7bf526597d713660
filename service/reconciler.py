"""The database is the truth: re-enqueue jobs the broker lost and recover jobs whose worker died.

One leader at a time (a PostgreSQL advisory lock, or a file lock next to the SQLite database) runs
``reconcile_once`` every few seconds inside the API process:

- a ``running`` job whose heartbeat is older than ``heartbeat_timeout`` lost its worker: it goes
  back to ``queued`` (it will resume from its latest checkpoint) until ``max_restarts``, then fails
  with ``worker_lost``. Either way its ``attempt`` is bumped, which fences the old worker out: if it
  was only cut off or frozen, its next write is refused and it stops (``JobRunRepository``);
- queue by queue, ``queued`` jobs beyond what that queue holds in the broker (after a Redis flush, a
  lost publish) are published again, the longest-unpublished (oldest ``enqueued_at``) first. Counting
  per queue matters: a surplus message in one queue must not hide a lost one in another. A duplicate
  delivery is harmless (the task's claim lets one delivery run); a lost one is not.

The leader re-verifies its lock on every pass: a PostgreSQL session lock disappears with its
connection, and a leader that kept going after that would reconcile next to the new one.
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
from service.queue import queue_depths, send_train
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
            job.attempt += 1  # the silent worker may only be cut off or frozen: fence it out
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
    depths = queue_depths(state.celery, state.settings)
    if depths is None:
        return 0
    default = state.settings.placement.queues[0].name
    cutoff = now() - cfg.requeue_after
    due: list[tuple[str, str]] = []
    with session_scope(state.sessions) as session:
        queued = session.scalars(select(Job).where(Job.status == "queued")
                                 .order_by(Job.enqueued_at.is_not(None), Job.enqueued_at, Job.created_at)).all()
        by_queue: dict[str, list[Job]] = {}
        for job in queued:
            by_queue.setdefault(job.queue or default, []).append(job)
        for queue, jobs in by_queue.items():
            missing = len(jobs) - depths.get(queue, 0)  # a queue the broker does not know holds nothing
            if missing <= 0:
                continue
            for job in [j for j in jobs if j.enqueued_at is None or j.enqueued_at < cutoff][:missing]:
                job.enqueued_at = now()
                due.append((job.id, queue))
    sent = sum(send_train(state.celery, state.settings, job_id, queue) for job_id, queue in due)
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
        """True while this process leads. Called on every pass: a held PostgreSQL lock is verified
        (its connection may have dropped, taking the lock with it), not assumed."""
        if self._file is not None:
            return True
        if self._conn is not None:
            if self._still_held():
                return True
            self._drop_connection()
        if self.state.settings.database.is_sqlite:
            return self._acquire_file()
        conn = self.state.engine.connect()
        try:
            acquired = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                         {"k": ADVISORY_LOCK_KEY}).scalar())
            conn.commit()  # the lock is session-level; do not sit idle in a transaction
        except Exception:
            conn.invalidate()
            conn.close()
            raise
        if acquired:
            self._conn = conn
            return True
        conn.close()
        return False

    def _still_held(self) -> bool:
        try:
            held = bool(self._conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND granted AND classid = :hi AND objid = :lo AND objsubid = 1"),
                {"hi": ADVISORY_LOCK_KEY >> 32, "lo": ADVISORY_LOCK_KEY & 0xFFFFFFFF}).scalar())
            self._conn.commit()
            return held
        except Exception:  # noqa: BLE001 - a dropped connection: the lock went with it
            log.warning("reconciler: the leader's database connection dropped; leadership is lost")
            return False

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        try:
            conn.invalidate()  # never hand a connection of unknown state back to the pool
        finally:
            conn.close()

    def lock_path(self) -> Path:
        """Next to the SQLite database file: every process that uses that file contends for one lock,
        whatever data dir it was started with."""
        path = self.state.settings.database.url.removeprefix("sqlite:///")
        if not path or path == ":memory:" or path.startswith("sqlite:"):
            return Path(self.state.settings.data_dir) / "reconciler.lock"
        database = Path(path)
        return database.with_name(database.name + ".reconciler.lock")

    def _acquire_file(self) -> bool:
        path = self.lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self) -> None:
        if self._conn is not None:
            try:  # pooled connections outlive close(): unlock explicitly
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                self._conn.commit()
                self._conn.close()
                self._conn = None
            except Exception:  # noqa: BLE001 - a dead connection holds no lock any more
                self._drop_connection()
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
