"""A worker that is told to stop (SIGTERM, Ctrl+C) hands its running job back instead of dropping it.

Kubernetes sends SIGTERM to the worker's main process, waits ``terminationGracePeriodSeconds`` and
then kills the pod. Celery answers SIGTERM with a warm shutdown (it stops taking messages and waits for
the running task), and sends ``worker_shutting_down`` in the main process. There, this module:

1. sets ``preempt_requested`` on the jobs this worker runs (``jobs.worker`` is its node name, set by
   the claim) and records an event. The training loop reads it at its next step boundary through
   ``Reporter.stop_reason`` ("preempt"), checkpoints that step and returns; the task boundary then calls
   :func:`hand_back`: the job goes back to ``queued`` under the same id, with an event that says why,
   and is published again, so another worker resumes at that step. The task returns and the worker exits.
2. arms a deadline. A job still running ``ALIGND_WORKER_SHUTDOWN_GRACE`` − 20 s after the signal (a
   step or an evaluation longer than the grace period, a frozen process) is handed back by force: the
   pool processes are killed (which also ends any database transaction they held open), the job is
   re-queued with its attempt number bumped — fencing out anything of the old run that still writes —
   and published, and the worker exits before the pod's grace runs out. The job resumes from its
   latest checkpoint.

A cold shutdown (SIGQUIT, a second Ctrl+C) takes the forced path at once.

**Grace period:** the worker exits within ``ALIGND_WORKER_SHUTDOWN_GRACE`` seconds of SIGTERM (default
300); the worker Deployments' ``terminationGracePeriodSeconds`` is set to the same number
(``tests/test_k8s_manifests.py`` checks it), and ``alignd serve`` waits as long for its worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import psutil
from celery.signals import worker_shutting_down
from sqlalchemy import select, text, update

from service.db.engine import session_scope
from service.db.models import Job, JobEvent, now
from service.db.repositories import JobRunRepository
from service.queue import send_train
from service.settings import Settings
from service.state import AppState
from workers.reporting import Reporter

log = logging.getLogger("alignd.worker")

#: Seconds before the end of the grace period at which a job still running is handed back by force.
FORCE_MARGIN = 20.0


def hand_back(state: AppState, reporter: Reporter) -> str:
    """The task boundary's end of a preempted run: the job checkpointed; it goes back to ``queued``.

    Returns the status the job is in now (``queued``, or whatever it became meanwhile, e.g. cancelled)."""
    with session_scope(state.sessions) as session:
        repo = JobRunRepository(session, reporter.job_id, reporter.attempt)
        step = repo.job().step
        handed, queue = repo.hand_back(
            f"Worker shutting down: checkpointed at step {step} and handed the job back to the queue; "
            f"another worker resumes from step {step}", data={"step": step, "reason": "worker_shutdown"})
        status = "queued" if handed else repo.job().status
    if handed:
        send_train(state.celery, state.settings, reporter.job_id, queue)
        log.info("job %s: preempted at step %d and re-queued", reporter.job_id, step)
    return status


def _wait_briefly_for_locks(session: Any) -> None:
    """A training process frozen inside a write transaction holds the job's row (or SQLite's write lock):
    wait 2 s at most, so the shutdown's deadline is never held up by it (the next try comes a second later)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL lock_timeout = '2s'"))
    else:
        session.execute(text("PRAGMA busy_timeout = 2000"))


def request_preemption(state: AppState, worker: str) -> list[str]:
    """Ask every job this worker runs to checkpoint at its next step and hand itself back."""
    with session_scope(state.sessions) as session:
        _wait_briefly_for_locks(session)
        ids = list(session.scalars(
            update(Job).where(Job.worker == worker, Job.status == "running", Job.preempt_requested.is_(False))
            .values(preempt_requested=True).returning(Job.id)))
        for job_id in ids:
            session.add(JobEvent(job_id=job_id, level="warn", data={"reason": "worker_shutdown"},
                                 message="Worker shutting down: the job checkpoints at its next step and goes "
                                         "back to the queue"))
    return ids


def force_hand_back(state: AppState, worker: str) -> list[str]:
    """Re-queue, with a new attempt number, whatever this worker still runs; publish each job again.

    Bumping ``attempt`` fences the training process (still alive, or about to be killed) out of every
    later write, so no step it finishes afterwards can land in the job."""
    moved: list[tuple[str, str | None]] = []
    with session_scope(state.sessions) as session:
        _wait_briefly_for_locks(session)
        rows = session.execute(select(Job.id, Job.queue, Job.step).where(Job.worker == worker,
                                                                         Job.status == "running")).all()
        for job_id, queue, step in rows:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker)
                .values(status="queued", attempt=Job.attempt + 1, preempt_requested=False, enqueued_at=now(),
                        worker=None))
            if (result.rowcount or 0) == 1:  # type: ignore[attr-defined]
                session.add(JobEvent(job_id=job_id, level="warn", data={"reason": "worker_shutdown", "step": step},
                                     message="Worker shutting down: the job did not reach a step boundary within "
                                             "the grace period; re-queued to resume from its latest checkpoint"))
                moved.append((job_id, queue))
    for job_id, queue in moved:
        send_train(state.celery, state.settings, job_id, queue)
    return [job_id for job_id, _ in moved]


def _kill_pool() -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            continue


class Shutdown:
    """What the worker's main process does once Celery starts shutting down."""

    def __init__(self, settings: Settings, worker: str) -> None:
        self.settings = settings
        self.worker = worker
        self.grace = settings.worker.shutdown_grace
        self._state: AppState | None = None
        self._forced = threading.Event()
        self._warm_started = threading.Event()

    @property
    def state(self) -> AppState:
        if self._state is None:  # created after the pool forked: no connection is shared with a child
            self._state = AppState(self.settings)
        return self._state

    def warm(self) -> None:
        """Ask for a hand-back (again every second: a job claimed just after the signal is asked too);
        past the deadline, force it."""
        if self._warm_started.is_set():
            return  # a second SIGTERM: the first one's thread is on it
        self._warm_started.set()
        deadline = time.monotonic() + max(1.0, self.grace - FORCE_MARGIN)
        while time.monotonic() < deadline:
            try:
                ids = request_preemption(self.state, self.worker)
                if ids:
                    log.info("worker %s shutting down: asked %s to checkpoint and hand back", self.worker, ids)
            except Exception:  # noqa: BLE001 - retried; the deadline below still hands the job back
                log.exception("could not record the preemption request")
            if self._forced.wait(timeout=1.0):
                return
        self.cold()

    def cold(self) -> None:
        if self._forced.is_set():
            return
        self._forced.set()
        # Kill first: a dead process's database session ends, and with it any lock it held on the job.
        _kill_pool()
        for _ in range(3):
            try:
                moved = force_hand_back(self.state, self.worker)
                if moved:
                    log.warning("worker %s: handed %s back by force", self.worker, moved)
                break
            except Exception:  # noqa: BLE001 - the reconciler re-queues it once the heartbeat stops
                log.exception("could not hand the running jobs back")
                time.sleep(1.0)
        threading.Timer(FORCE_MARGIN / 2, os._exit, args=(1,)).start()  # if Celery's own shutdown hangs


_shutdown: Shutdown | None = None

#: Set in the worker's main process the moment Celery starts shutting down. Pool processes forked after
#: that (``max_tasks_per_child=1`` forks one per job) inherit it, so a message the consumer still takes
#: during the shutdown is handed back to the broker instead of being claimed by a worker about to exit.
_stopping = threading.Event()


def shutting_down() -> bool:
    """Whether this worker (or the main process this pool process was forked from) is shutting down."""
    return _stopping.is_set()


@worker_shutting_down.connect
def _on_worker_shutting_down(sender: Any = None, sig: str = "", how: str = "", **_: Any) -> None:
    """Runs inside Celery's signal handler in the main process: start the work on a thread and return."""
    global _shutdown
    from workers.celery_app import settings

    _stopping.set()
    if _shutdown is None:
        _shutdown = Shutdown(settings, str(sender))
    target = _shutdown.cold if how == "Cold" else _shutdown.warm
    threading.Thread(target=target, name=f"alignd-shutdown-{how.lower()}", daemon=True).start()
    log.info("worker %s received %s (%s shutdown); grace period %.0f s", sender, sig, how, _shutdown.grace)


__all__ = ["hand_back", "request_preemption", "force_hand_back", "Shutdown", "shutting_down"]
