"""How a running job talks back: events, metric points, progress and checkpoints in the database.

Each call is its own short transaction, so the API sees progress as it happens and a crash loses at
most the step in flight.
"""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db.engine import session_scope
from service.db.repositories import JobRunRepository


# What a one-line step event shows first, whichever method produced the metrics.
SUMMARY_ORDER = ("loss", "rewards/accuracies", "rewards/margins", "objective/kl", "objective/scores",
                 "accuracy", "mean_token_accuracy", "grad_norm", "learning_rate")


class Reporter:
    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.started = time.time()
        self._last_cancel_check = 0.0
        self._cancelled = False

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with session_scope(self.sessions) as s:
            JobRunRepository(s, self.job_id).add_event(message, level=level, data=data)

    def step(self, step: int, total_steps: int, values: dict[str, float], *, trained_tokens: int) -> None:
        """One optimizer step: metric points, a ``metrics`` event and the job's progress, atomically."""
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        elapsed = time.time() - self.started
        eta = self.started + elapsed / step * total_steps if step else None
        shown = [k for k in SUMMARY_ORDER if k in clean][:4]
        summary = ", ".join(f"{k}={clean[k]:.4f}" for k in shown)
        with session_scope(self.sessions) as s:
            repo = JobRunRepository(s, self.job_id)
            repo.add_metrics(step, clean)
            repo.add_event(f"Step {step}/{total_steps}: {summary}", type="metrics",
                           data={"step": step, "total_steps": total_steps, **clean})
            repo.progress(step=step, total_steps=total_steps, trained_tokens=trained_tokens,
                          estimated_finish=eta)

    def metrics_only(self, step: int, values: dict[str, float]) -> None:
        with session_scope(self.sessions) as s:
            JobRunRepository(s, self.job_id).add_metrics(step, values)

    def progress(self, *, step: int, total_steps: int) -> None:
        with session_scope(self.sessions) as s:
            JobRunRepository(s, self.job_id).progress(step=step, total_steps=total_steps)

    def checkpoint(self, step: int, metrics: dict[str, float], storage_key: str) -> None:
        with session_scope(self.sessions) as s:
            repo = JobRunRepository(s, self.job_id)
            repo.add_checkpoint(step, metrics, storage_key)
            repo.add_event(f"Checkpoint saved at step {step}", data={"step": step})

    def should_stop(self, *, min_interval: float = 0.5) -> bool:
        """True once the job was cancelled (or otherwise left ``running``); read at most every 0.5 s."""
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < min_interval:
            return False
        self._last_cancel_check = now
        with session_scope(self.sessions) as s:
            job = JobRunRepository(s, self.job_id).job()
            self._cancelled = job.cancel_requested or job.status != "running"
        return self._cancelled
