"""The Celery front: the ``alignd.train`` task claims the job, keeps its heartbeat, and runs it in this
process, as N ranks under ``accelerate launch``, or (several nodes) as a supervised node group.

The task takes only a job id and reloads everything (``workers.runner``), so a redelivered or
duplicated message is harmless: the claim (queued → running) lets exactly one delivery run, and its
attempt number fences every later write (a worker that lost the job stops and writes nothing).
"""

from __future__ import annotations

import logging

from celery.exceptions import Reject

from service.db.engine import session_scope
from service.db.repositories import JobLost, JobRunRepository
from service.queue import TRAIN_TASK
from service.settings import Settings
from service.state import AppState
from workers.celery_app import app, settings
from workers.launch import supervise
from workers.metrics_server import serve_worker_metrics
from workers.multinode import run_multinode
from workers.process_model import ensure_fresh_process, job_process_facts
from workers.reporting import Heartbeat, Reporter
from workers.runner import run_claimed
from workers.shutdown import shutting_down

log = logging.getLogger("alignd.worker")

_STATES: dict[str, AppState] = {}


def worker_state(settings: Settings) -> AppState:
    """One engine and store per settings for the life of the worker process."""
    key = repr(settings)
    if key not in _STATES:
        _STATES[key] = AppState(settings)
    return _STATES[key]


@app.task(name=TRAIN_TASK, acks_late=True)
def train(job_id: str) -> None:
    if shutting_down():  # taken during this worker's shutdown: back to the broker, for another worker
        log.info("job %s: this worker is shutting down; the message goes back to the queue", job_id)
        raise Reject(f"worker shutting down; {job_id} left for another worker", requeue=True)
    ensure_fresh_process()  # a new pool process per job, forked from a CUDA-free parent (process_model)
    run_job(job_id, settings, worker=train.request.hostname)


def run_job(job_id: str, settings: Settings, worker: str | None = None) -> str:
    """Run one job to an end state; returns the status it ended in (or 'skipped').

    ``worker`` (the Celery node name) is recorded on the job: that worker's ``/metrics`` shows it.
    A job with ``resources.gpus`` > 1 runs under ``accelerate launch`` (``workers.launch``); one with
    ``resources.nodes`` > 1 is supervised as a node group (``workers.multinode``)."""
    state = worker_state(settings)
    with session_scope(state.sessions) as session:
        repo = JobRunRepository(session, job_id)
        attempt = repo.claim(worker)
        if attempt is None:
            log.info("job %s is not queued any more; nothing to do", job_id)
            return "skipped"
        resources = dict(repo.job().resources or {})
    reporter = Reporter(state.sessions, job_id, attempt)
    try:
        with Heartbeat(reporter):
            single = int(resources.get("nodes") or 1) == 1 and int(resources.get("gpus") or 1) == 1
            facts = job_process_facts(cuda=single)  # the ranks of a multi-GPU job are processes of their own
            reporter.event(f"Training process {facts['pid']} started on {worker or 'this worker'}",
                           data={**facts, "worker": worker})
            if int(resources.get("nodes") or 1) > 1:  # a node group (JobSet, or local process groups)
                return run_multinode(state, job_id, resources, attempt)
            if int(resources.get("gpus") or 1) > 1:
                return supervise(state, job_id, reporter, resources)
            return run_claimed(state, job_id, reporter)
    except JobLost:
        # Fenced out: the reconciler handed the job to another worker while this one was cut off or
        # frozen. Its training has stopped; it writes nothing more and leaves the job to the new owner.
        log.warning("job %s: this worker lost the job (attempt %d was superseded); stopped its training "
                    "and left it to the worker that owns it now", job_id, attempt)
        return "lost"


__all__ = ["app", "train", "run_job", "serve_worker_metrics"]
