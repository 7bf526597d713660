"""Read-only queries behind Prometheus and the time estimates: running jobs' latest metric points,
finished jobs' durations, and the throughput measured on earlier jobs of a model.

Each is one or two indexed queries, cheap enough to run on every scrape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.db.models import Job, MetricPoint

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class RunningJob:
    id: str
    method: dict[str, Any]
    step: int
    #: the latest value of every metric point name written at or a few steps before ``step``
    latest: dict[str, float] = field(default_factory=dict)

    @property
    def method_type(self) -> str:
        return str(self.method.get("type", "unknown"))

    def hyperparameter(self, name: str) -> Any:
        return ((self.method.get(self.method_type) or {}).get("hyperparameters") or {}).get(name)


def running_jobs(session: Session, *, worker: str | None = None, window: int = 3) -> list[RunningJob]:
    """Jobs whose status is ``running`` (only ``worker``'s when given) with their latest points.

    Points are read by the ``(job_id, step)`` index over the last ``window`` steps, so a scrape costs
    the same at step 10 as at step 100 000.
    """
    stmt = select(Job.id, Job.method, Job.step).where(Job.status == "running")
    if worker is not None:
        stmt = stmt.where(Job.worker == worker)
    jobs = [RunningJob(job_id, method or {}, step or 0) for job_id, method, step in session.execute(stmt)]
    for job in jobs:
        rows = session.execute(
            select(MetricPoint.name, MetricPoint.value)
            .where(MetricPoint.job_id == job.id, MetricPoint.step > job.step - window,
                   MetricPoint.step <= job.step)
            .order_by(MetricPoint.step, MetricPoint.seq)
        )
        job.latest = {name: value for name, value in rows}
    return jobs


@dataclass
class DurationBucketRow:
    method: str
    status: str
    count: int
    total: float
    #: cumulative counts, one per bound (``duration <= bound``)
    cumulative: list[int]


def job_durations(session: Session, bounds: Sequence[float]) -> list[DurationBucketRow]:
    """Finished jobs by method and status, bucketed in SQL.

    A job's duration is ``finished_at - started_at`` (time on a worker, restarts included); a job
    cancelled or failed before any worker took it counts from ``created_at``.
    """
    method_type = Job.method["type"].as_string()
    duration = Job.finished_at - func.coalesce(Job.started_at, Job.created_at)
    buckets = [func.sum(case((duration <= bound, 1), else_=0)) for bound in bounds]
    stmt = (select(method_type, Job.status, func.count(), func.sum(duration), *buckets)
            .where(Job.status.in_(TERMINAL), Job.finished_at.is_not(None))
            .group_by(method_type, Job.status))
    return [DurationBucketRow(str(row[0] or "unknown"), row[1], int(row[2]), float(row[3] or 0.0),
                              [int(n or 0) for n in row[4:]])
            for row in session.execute(stmt)]


def measured_tokens_per_second(session: Session, model: str, method_type: str, *,
                               jobs: int = 10) -> float | None:
    """Mean per-step ``tokens_per_second`` over the last ``jobs`` succeeded jobs of this model and method.

    Per-step throughput leaves model loading and saving out, which is what a projection to a larger
    dataset needs. None when no such job has been measured.
    """
    recent = (select(Job.id).where(Job.model == model, Job.status == "succeeded",
                                   Job.method["type"].as_string() == method_type)
              .order_by(Job.finished_at.desc()).limit(jobs).scalar_subquery())
    value = session.scalar(select(func.avg(MetricPoint.value))
                           .where(MetricPoint.job_id.in_(recent), MetricPoint.name == "tokens_per_second"))
    return float(value) if value is not None and value > 0 else None


def jobs_by_queue(session: Session, statuses: Sequence[str] = ("queued", "running", "paused")) -> dict[
        tuple[str, str], int]:
    """(queue, status) → jobs routed to that queue; what a worker autoscaler should follow."""
    stmt = (select(Job.queue, Job.status, func.count()).where(Job.status.in_(statuses))
            .group_by(Job.queue, Job.status))
    return {(queue or "", status): int(n) for queue, status, n in session.execute(stmt)}
