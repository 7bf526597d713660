"""How a running job talks back: events, metric points, progress and checkpoints in the database.

Each call is its own short transaction, so the API sees progress as it happens and a crash loses at
most the step in flight.

Every step also records the job's peak host RSS and peak CUDA memory per device (``workers.memory``),
so recipes report memory without doing anything. Under ``accelerate launch`` (N ranks) only rank 0
writes; each step's metrics are combined over the ranks first (``workers.distributed``: tokens and
throughput summed, losses and rewards averaged), and rank 0's cancel/pause decision reaches every
rank in the same step.

Fencing: the Reporter carries the attempt number of the claim that started this run, and every
write it makes is conditional on it (``JobRunRepository``). Once the reconciler has handed the job
to another worker, a write from this one — a worker that was cut off from the database or frozen —
raises :class:`JobLost`, and so does the next stop check; the task boundary catches it and the worker
leaves the job alone.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db.engine import session_scope
from service.db.repositories import JobLost, JobRunRepository
from workers.distributed import from_main, gather_metrics, is_main_process
from workers.memory import PeakMemory

HEARTBEAT_INTERVAL = float(os.environ.get("ALIGND_HEARTBEAT_INTERVAL") or 10.0)


# What a one-line step event shows first, whichever method produced the metrics.
SUMMARY_ORDER = ("loss", "rewards/accuracies", "rewards/margins", "objective/kl", "objective/scores",
                 "accuracy", "mean_token_accuracy", "grad_norm", "learning_rate",
                 "pairs/kept", "pairs/dropped_margin", "score/mean_gap")


#: Why the loop must stop: the user cancelled, asked to pause, or this worker is shutting down
#: ("preempt": checkpoint and hand the job back as queued); "lost" never leaves ``stop_reason`` (it raises).
STOP_REASONS = ("cancel", "pause", "preempt")


class Reporter:
    def __init__(self, sessions: sessionmaker[Session], job_id: str, attempt: int | None = None) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt  # the claim's attempt: every write is fenced on it (None: unfenced)
        self.started = time.time()
        self._last_cancel_check = 0.0
        self._stop_reason: str | None = None  # decided (the same on every rank)
        self._seen: str | None = None  # read by rank 0, taken up at the next stop check
        self.lost = False  # set by the heartbeat thread when its beat was refused
        self.memory = PeakMemory()

    def _repo(self, session: Session) -> JobRunRepository:
        return JobRunRepository(session, self.job_id, self.attempt)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes."""
        return is_main_process()

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
              type: str = "message") -> None:  # noqa: A002 - the API's field is called "type"
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            self._repo(s).add_event(message, level=level, data=data, type=type)

    def step(self, step: int, total_steps: int, values: dict[str, float], *, trained_tokens: int) -> None:
        """One optimizer step: metric points, a ``metrics`` event and the job's progress, atomically."""
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        clean.update(self.memory.sample())
        clean = gather_metrics({**clean, "_trained_tokens": float(trained_tokens)})
        trained_tokens = int(clean.pop("_trained_tokens"))
        if not self.is_main:
            return
        elapsed = time.time() - self.started
        eta = self.started + elapsed / step * total_steps if step else None
        shown = [k for k in SUMMARY_ORDER if k in clean][:4]
        summary = ", ".join(f"{k}={clean[k]:.4f}" for k in shown)
        with session_scope(self.sessions) as s:
            repo = self._repo(s)
            repo.add_metrics(step, clean)
            repo.add_event(f"Step {step}/{total_steps}: {summary}", type="metrics",
                           data={"step": step, "total_steps": total_steps, **clean})
            repo.progress(step=step, total_steps=total_steps, trained_tokens=trained_tokens,
                          estimated_finish=eta)
            # The stop flags ride on the step's own transaction: a cancel that lands while step N runs
            # is seen before step N+1 starts, however fast the steps are (at most one more step).
            if self._seen is None:
                self._seen = self._reason_from(repo.job())

    def metrics_only(self, step: int, values: dict[str, float]) -> None:
        values = gather_metrics(values)
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            self._repo(s).add_metrics(step, values)

    def progress(self, *, step: int, total_steps: int) -> None:
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            self._repo(s).progress(step=step, total_steps=total_steps)

    def checkpoint(self, step: int, metrics: dict[str, float], storage_key: str) -> None:
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            repo = self._repo(s)
            repo.add_checkpoint(step, metrics, storage_key)
            repo.add_event(f"Checkpoint saved at step {step}", data={"step": step})

    def drop_checkpoint(self, storage_key: str) -> None:
        """Delete a retired checkpoint's row (the loop then deletes its files: never a row without them)."""
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            self._repo(s).delete_checkpoint(storage_key)

    def stop_reason(self, *, min_interval: float = 0.5) -> str | None:
        """``"cancel"``, ``"pause"``, ``"preempt"`` or None. A job that left ``running`` otherwise counts
        as cancelled. Raises :class:`JobLost` once another attempt owns the job.

        Under several ranks every rank calls this once per step; rank 0 reads the database and
        its answer is broadcast, so all ranks stop (or give the job up) at the same step."""
        if self._stop_reason is None:
            reason = self._read_stop_reason(min_interval) if self.is_main else None
            self._stop_reason = from_main(reason)
        if self._stop_reason == "lost":
            raise JobLost(self.job_id, self.attempt or 0)
        return self._stop_reason

    def _reason_from(self, job: Any) -> str | None:
        if self.lost or (self.attempt is not None and job.attempt != self.attempt):
            return "lost"
        if job.cancel_requested or job.status != "running":
            return "cancel"
        if job.pause_requested:
            return "pause"
        if job.preempt_requested:
            return "preempt"
        return None

    def _read_stop_reason(self, min_interval: float) -> str | None:
        if self._seen is not None:
            return self._seen
        if self.lost:
            return "lost"
        now = time.monotonic()
        if now - self._last_cancel_check < min_interval:
            return None
        self._last_cancel_check = now
        with session_scope(self.sessions) as s:
            self._seen = self._reason_from(JobRunRepository(s, self.job_id).job())
        return self._seen

    def resumed(self, step: int) -> None:
        """Steps after ``step`` were lost with the worker: their points go, so the series has no repeat."""
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            repo = self._repo(s)
            repo.drop_series_after(step)
            repo.add_event(f"resumed from step {step}", data={"step": step})

    def restart(self) -> None:
        """A recipe that checkpoints nothing runs again from the start: the aborted attempt's points go."""
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            self._repo(s).clear_series()

    def heartbeat(self) -> None:
        if not self.is_main:
            return
        with session_scope(self.sessions) as s:
            self._repo(s).heartbeat()


class Heartbeat:
    """Keeps ``heartbeat_at`` fresh while a job runs, also through long set-up and slow steps,
    so the reconciler can tell a slow job from a dead worker."""

    def __init__(self, reporter: Reporter, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.reporter = reporter
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alignd-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reporter.heartbeat()
            except JobLost:  # another attempt owns the job: the next stop check gives it up
                self.reporter.lost = True
                return
            except Exception:  # noqa: BLE001,S112 - a missed beat is retried on the next tick
                continue
