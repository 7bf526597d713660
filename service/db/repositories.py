"""All queries live here.

``OrgRepository`` filters every read by the caller's organization, so a handler cannot forget it:
another organization's object simply does not exist (404). ``JobRunRepository`` is the worker's
view of one job by id; the task boundary commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from service.db.models import Checkpoint, File, IdempotencyKey, Job, JobEvent, MetricPoint, Organization, new_id, now
from service.errors import not_found


def _page_after(stmt: Select[Any], model: Any, cursor: Any | None, *, descending: bool = True) -> Select[Any]:
    """Keyset pagination on (created_at, id), newest first as in OpenAI's lists."""
    if cursor is not None:
        if descending:
            stmt = stmt.where(or_(model.created_at < cursor.created_at,
                                  and_(model.created_at == cursor.created_at, model.id < cursor.id)))
        else:
            stmt = stmt.where(or_(model.created_at > cursor.created_at,
                                  and_(model.created_at == cursor.created_at, model.id > cursor.id)))
    order = (model.created_at.desc(), model.id.desc()) if descending else (model.created_at, model.id)
    return stmt.order_by(*order)


#: Longest ``ft:`` parent chain walked (a chain is acyclic by construction; this bounds a corrupt one).
MAX_LINEAGE = 64


@dataclass
class Lineage:
    """Where a model name's weights come from: the registry base, and the archives of the fine-tunes
    merged onto it, oldest first. ``missing`` names the first link that has no usable archive."""

    base: str
    adapter_keys: list[str] = field(default_factory=list)
    missing: str | None = None


def lineage(session: Session, organization_id: str, name: str) -> Lineage:
    """The one walk up an ``ft:`` chain, for the API (estimates) and the worker (loading)."""
    keys: list[str] = []
    model = name
    for _ in range(MAX_LINEAGE):
        if not model.startswith("ft:"):
            return Lineage(model, keys)
        parent = session.scalar(select(Job).where(Job.fine_tuned_model == model,
                                                  Job.organization_id == organization_id))
        if parent is None or not parent.adapter_key:
            return Lineage(model, keys, missing=model)
        keys.insert(0, parent.adapter_key)
        model = parent.model
    return Lineage(model, keys, missing=model)


class OrgRepository:
    def __init__(self, session: Session, organization_id: str) -> None:
        self.session = session
        self.org = organization_id

    # files
    def add(self, obj: Any) -> None:
        self.session.add(obj)
        self.session.flush()

    def get_file(self, file_id: str, param: str | None = None) -> File:
        row = self.session.scalar(select(File).where(File.id == file_id, File.organization_id == self.org))
        if row is None:
            raise not_found("file", file_id, param)
        return row

    def list_files(self, *, purpose: str | None, after: str | None, limit: int) -> tuple[list[File], bool]:
        stmt = select(File).where(File.organization_id == self.org)
        if purpose:
            stmt = stmt.where(File.purpose == purpose)
        cursor = self.get_file(after, "after") if after else None
        rows = list(self.session.scalars(_page_after(stmt, File, cursor).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def delete_file(self, file: File) -> None:
        self.session.delete(file)
        self.session.flush()

    # jobs
    def get_job(self, job_id: str) -> Job:
        row = self.session.scalar(select(Job).where(Job.id == job_id, Job.organization_id == self.org))
        if row is None:
            raise not_found("job", job_id)
        return row

    def list_jobs(self, *, after: str | None, limit: int) -> tuple[list[Job], bool]:
        stmt = select(Job).where(Job.organization_id == self.org)
        cursor = self.get_job(after) if after else None
        rows = list(self.session.scalars(_page_after(stmt, Job, cursor).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def job_by_fine_tuned_model(self, name: str) -> Job | None:
        return self.session.scalar(
            select(Job).where(Job.fine_tuned_model == name, Job.organization_id == self.org)
        )

    def lineage(self, name: str) -> Lineage:
        return lineage(self.session, self.org, name)

    def fine_tuned_models(self) -> Sequence[Job]:
        return self.session.scalars(
            select(Job).where(Job.organization_id == self.org, Job.status == "succeeded",
                              Job.fine_tuned_model.is_not(None)).order_by(Job.created_at)
        ).all()

    def list_events(self, job: Job, *, after: int | None, limit: int, ascending: bool) -> tuple[list[JobEvent], bool]:
        stmt = select(JobEvent).where(JobEvent.job_id == job.id)
        if after is not None:
            stmt = stmt.where(JobEvent.seq > after if ascending else JobEvent.seq < after)
        stmt = stmt.order_by(JobEvent.seq if ascending else JobEvent.seq.desc()).limit(limit + 1)
        rows = list(self.session.scalars(stmt))
        return rows[:limit], len(rows) > limit

    def list_checkpoints(self, job: Job, *, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
        stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
        if after:
            cursor = self.get_checkpoint(job, after)
            stmt = stmt.where(Checkpoint.step_number < cursor.step_number)
        rows = list(self.session.scalars(stmt.order_by(Checkpoint.step_number.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def get_checkpoint(self, job: Job, checkpoint_id: str) -> Checkpoint:
        row = self.session.scalar(
            select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id)
        )
        if row is None:
            raise not_found("checkpoint", checkpoint_id)
        return row

    def list_metrics(self, job: Job, *, step_from: int | None, step_to: int | None,
                     names: list[str] | None) -> list[MetricPoint]:
        stmt = select(MetricPoint).where(MetricPoint.job_id == job.id)
        if step_from is not None:
            stmt = stmt.where(MetricPoint.step >= step_from)
        if step_to is not None:
            stmt = stmt.where(MetricPoint.step <= step_to)
        if names:
            stmt = stmt.where(MetricPoint.name.in_(names))
        return list(self.session.scalars(stmt.order_by(MetricPoint.step, MetricPoint.seq)))

    # idempotency
    def idempotency(self, scope: str, key: str) -> IdempotencyKey | None:
        return self.session.get(IdempotencyKey, (self.org, scope, key))

    def remember_idempotency(self, scope: str, key: str, request_hash: str, object_id: str) -> None:
        self.session.add(IdempotencyKey(organization_id=self.org, scope=scope, key=key,
                                        request_hash=request_hash, object_id=object_id))
        self.session.flush()


#: Seconds a fenced write transaction may sit idle (its process frozen) before PostgreSQL ends it.
#: Those transactions only ever run a few statements back to back, so any real pause means trouble.
FENCED_TRANSACTION_TIMEOUT = 30.0


class JobLost(Exception):
    """This worker's attempt no longer owns the job: the reconciler or another worker's claim took it.

    Raised by every fenced write (and so from the worker's ``Reporter``); the task boundary catches it,
    logs that this worker lost the job, and writes nothing more."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id}: attempt {attempt} no longer owns the job")
        self.job_id = job_id
        self.attempt = attempt


class JobRunRepository:
    """The worker's view of one job. It trusts the job id: the API already checked ownership.

    ``attempt`` is the number the worker's claim returned. With it, every write is *fenced*: it first
    runs ``UPDATE jobs SET attempt = attempt WHERE id = :id AND attempt = :mine`` in the same
    transaction, which takes the job row's lock (PostgreSQL) or the database's write lock (SQLite)
    and raises :class:`JobLost` when no row matched. A reconciler that re-queues the job bumps
    ``attempt`` under the same lock, so a write is either committed while this attempt still owned the
    job or refused — there is no window in between. Without ``attempt`` (reads, tools) nothing is fenced.
    """

    def __init__(self, session: Session, job_id: str, attempt: int | None = None) -> None:
        self.session = session
        self.job_id = job_id
        self.attempt = attempt

    def _fence(self) -> None:
        if self.attempt is None:
            return
        if self.session.get_bind().dialect.name == "postgresql":
            # A worker frozen inside this transaction would hold the job row's lock for ever and keep
            # the reconciler from handing the job over: PostgreSQL ends such a session instead.
            self.session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = "
                                      f"{int(FENCED_TRANSACTION_TIMEOUT * 1000)}"))
        result = self.session.execute(update(Job).where(Job.id == self.job_id, Job.attempt == self.attempt)
                                      .values(attempt=Job.attempt))
        if (result.rowcount or 0) != 1:  # type: ignore[attr-defined]
            raise JobLost(self.job_id, self.attempt)

    def fence(self) -> None:
        """Raise :class:`JobLost` unless this attempt still owns the job (a fenced write of nothing)."""
        self._fence()

    def _mine(self) -> Any:
        """The WHERE clause of a state change this attempt makes to its running job."""
        clause = and_(Job.id == self.job_id, Job.status == "running")
        return clause if self.attempt is None else and_(clause, Job.attempt == self.attempt)

    def job(self) -> Job:
        job = self.session.get(Job, self.job_id)
        if job is None:
            raise LookupError(f"job {self.job_id} does not exist")
        self.session.refresh(job)
        return job

    def claim(self, worker: str | None = None) -> int | None:
        """queued → running only if still queued, so a duplicate delivery of the task does nothing.

        Returns the claim's attempt number (None when the job was not queued): the fence every later
        write of this run carries. ``worker`` (the Celery node name) is recorded so that worker's
        ``/metrics`` shows the job and its shutdown can hand the job back."""
        attempt = self.session.scalar(
            update(Job).where(Job.id == self.job_id, Job.status == "queued")
            .values(status="running", started_at=now(), heartbeat_at=now(), worker=worker,
                    attempt=Job.attempt + 1, preempt_requested=False)
            .returning(Job.attempt)
        )
        if attempt is not None:
            self.attempt = int(attempt)
        return self.attempt if attempt is not None else None

    def file(self, file_id: str) -> File:
        row = self.session.get(File, file_id)
        if row is None:
            raise LookupError(f"file {file_id} does not exist")
        return row

    def add_event(self, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> None:
        self._fence()
        self.session.add(JobEvent(job_id=self.job_id, message=message, level=level, type=type, data=data))

    def add_metrics(self, step: int, values: dict[str, float]) -> None:
        self._fence()
        self.session.add_all(MetricPoint(job_id=self.job_id, step=step, name=k, value=float(v))
                             for k, v in values.items())

    def add_checkpoint(self, step: int, metrics: dict[str, float], storage_key: str) -> Checkpoint:
        self._fence()
        row = Checkpoint(id=new_id("ftckpt"), job_id=self.job_id, step_number=step, metrics=metrics,
                         storage_key=storage_key)
        self.session.add(row)
        return row

    def delete_checkpoint(self, storage_key: str) -> None:
        self._fence()
        self.session.execute(delete(Checkpoint).where(Checkpoint.job_id == self.job_id,
                                                      Checkpoint.storage_key == storage_key))

    def progress(self, *, step: int, total_steps: int | None = None, trained_tokens: int | None = None,
                 estimated_finish: float | None = None) -> None:
        self._fence()
        values: dict[str, Any] = {"step": step, "heartbeat_at": now()}
        if total_steps is not None:
            values["total_steps"] = total_steps
        if trained_tokens is not None:
            values["trained_tokens"] = trained_tokens
        if estimated_finish is not None:
            values["estimated_finish"] = estimated_finish
        self.session.execute(update(Job).where(Job.id == self.job_id).values(**values))

    def heartbeat(self) -> None:
        self._fence()
        self.session.execute(update(Job).where(self._mine()).values(heartbeat_at=now()))

    def mark_paused(self) -> None:
        self._fence()
        self.session.execute(update(Job).where(self._mine()).values(status="paused", pause_requested=False))

    def hand_back(self, message: str, data: dict[str, Any] | None = None) -> tuple[bool, str | None]:
        """running → queued by the worker itself (it is shutting down), with an event saying why.

        Returns (handed back?, the job's queue to publish to); not handed back when the job was not
        running any more (cancelled meanwhile)."""
        self._fence()
        row = self.session.execute(
            update(Job).where(self._mine())
            .values(status="queued", preempt_requested=False, enqueued_at=now(), worker=None)
            .returning(Job.queue)
        ).first()
        if row is None:
            return False, None
        self.session.add(JobEvent(job_id=self.job_id, level="warn", message=message, data=data))
        return True, row[0]

    def count_restart(self) -> int:
        """One more restart of this job (a lost worker, a failed node); returns the new count."""
        self.session.execute(update(Job).where(Job.id == self.job_id).values(restarts=Job.restarts + 1))
        return int(self.session.scalar(select(Job.restarts).where(Job.id == self.job_id)) or 0)

    def drop_series_after(self, step: int) -> None:
        """Resuming from step N: points and checkpoints of steps after N were never made durable."""
        self._fence()
        self.session.execute(delete(MetricPoint).where(MetricPoint.job_id == self.job_id, MetricPoint.step > step))
        self.session.execute(delete(Checkpoint).where(Checkpoint.job_id == self.job_id,
                                                      Checkpoint.step_number > step))

    def latest_checkpoint(self) -> Checkpoint | None:
        return self.session.scalar(select(Checkpoint).where(Checkpoint.job_id == self.job_id)
                                   .order_by(Checkpoint.step_number.desc()).limit(1))

    def cancel_requested(self) -> bool:
        return bool(self.session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))

    def finish(self, status: str, *, error: dict[str, Any] | None = None,
               fine_tuned_model: str | None = None, adapter_key: str | None = None,
               result_files: list[str] | None = None) -> None:
        self._fence()
        values: dict[str, Any] = {"status": status, "finished_at": now(), "error": error}
        if fine_tuned_model is not None:
            values["fine_tuned_model"] = fine_tuned_model
        if adapter_key is not None:
            values["adapter_key"] = adapter_key
        if result_files is not None:
            values["result_files"] = result_files
        # Conditional: a job cancelled while its last step ran stays cancelled.
        self.session.execute(update(Job).where(self._mine()).values(**values))

    def parent_by_fine_tuned_model(self, organization_id: str, name: str) -> Job | None:
        return self.session.scalar(select(Job).where(Job.fine_tuned_model == name,
                                                     Job.organization_id == organization_id))

    def lineage(self, organization_id: str, name: str) -> Lineage:
        return lineage(self.session, organization_id, name)

    def organization_name(self, organization_id: str) -> str:
        org = self.session.get(Organization, organization_id)
        return org.name if org else organization_id

    def clear_series(self) -> None:
        """A job that restarts from scratch drops the points of the aborted attempt."""
        self._fence()
        self.session.execute(delete(MetricPoint).where(MetricPoint.job_id == self.job_id))
        self.session.execute(delete(Checkpoint).where(Checkpoint.job_id == self.job_id))


def count_jobs_by_status(session: Session) -> dict[str, int]:
    return {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
