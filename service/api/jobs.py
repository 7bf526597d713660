"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, events, checkpoints, metrics, adapter."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import Parameter
from litestar.response import Stream

from service.api.deps import app_state, org_repo
from service.auth import Principal
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.idempotency import run_idempotent
from service.jobs.planning import present_estimate
from service.jobs.service import (
    cancel_job,
    check_job,
    create_job,
    pause_job,
    present_event,
    present_job,
    request_hash,
    resume_job,
)
from service.jobs.spec import JobCreate, to_builtins
from service.queue import send_train
from service.state import AppState

Limit = Annotated[int, Parameter(ge=1, le=10000)]
IdempotencyHeader = Annotated[str | None, Parameter(header="Idempotency-Key", max_length=256)]


def _event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    try:
        return int(after.removeprefix("ftevent-"))
    except ValueError:
        raise APIError(400, f"after: '{after}' is not an event id", code="invalid_request", param="after") from None


def _stream(state: AppState, key: str, filename: str) -> Stream:
    if not state.store.exists(key):
        raise APIError(404, "the archive is not in the object store", code="not_found")
    return Stream(state.store.iter_chunks(key), media_type="application/gzip",
                  headers={"Content-Disposition": f'attachment; filename="{filename}"'})


class JobsController(Controller):
    path = "/v1/fine_tuning/jobs"
    tags = ["fine-tuning"]

    @post("/", status_code=200, sync_to_thread=True, summary="Create a fine-tuning job")
    def create(self, request: Request, principal: Principal, data: JobCreate,  # type: ignore[type-arg]
               idempotency_key: IdempotencyHeader = None) -> dict[str, Any]:
        state = app_state(request)
        if data.dry_run:  # the estimate only: nothing is created, queued or remembered
            with org_repo(state, principal) as repo:
                return present_estimate(data, check_job(repo, state.settings, data, state.store))
        digest = request_hash(to_builtins(data))

        def create(repo: OrgRepository) -> tuple[str, dict[str, Any]]:
            job = create_job(repo, state.settings, data, state.store)
            return job.id, present_job(job)

        body, created = run_idempotent(state, principal, "jobs", idempotency_key, digest, create,
                                       lambda repo, object_id: present_job(repo.get_job(object_id)))
        if created:
            send_train(state.celery, state.settings, body["id"], body["resources"]["queue"])
        return body

    @get("/", sync_to_thread=True, summary="List fine-tuning jobs")
    def list_jobs(self, request: Request, principal: Principal,  # type: ignore[type-arg]
                  after: str | None = None, limit: Limit = 20) -> dict[str, Any]:
        with org_repo(app_state(request), principal) as repo:
            rows, has_more = repo.list_jobs(after=after, limit=limit)
            return {"object": "list", "data": [present_job(j) for j in rows], "has_more": has_more}

    @get("/{job_id:str}", sync_to_thread=True, summary="Retrieve a fine-tuning job")
    def retrieve(self, request: Request, principal: Principal, job_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        with org_repo(app_state(request), principal) as repo:
            return present_job(repo.get_job(job_id))

    @post("/{job_id:str}/cancel", status_code=200, sync_to_thread=True, summary="Cancel a job")
    def cancel(self, request: Request, principal: Principal, job_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        with org_repo(app_state(request), principal) as repo:
            return present_job(cancel_job(repo, repo.get_job(job_id)))

    @post("/{job_id:str}/pause", status_code=200, sync_to_thread=True,
          summary="Pause a job (checkpoint, free the worker)")
    def pause(self, request: Request, principal: Principal, job_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        with org_repo(app_state(request), principal) as repo:
            return present_job(pause_job(repo, repo.get_job(job_id)))

    @post("/{job_id:str}/resume", status_code=200, sync_to_thread=True, summary="Resume a paused job")
    def resume(self, request: Request, principal: Principal, job_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
        state = app_state(request)
        with org_repo(state, principal) as repo:
            body = present_job(resume_job(repo, repo.get_job(job_id)))
        send_train(state.celery, state.settings, job_id, body["resources"]["queue"])
        return body

    @get("/{job_id:str}/events", sync_to_thread=True, summary="List a job's events")
    def events(self, request: Request, principal: Principal, job_id: str,  # type: ignore[type-arg]
               after: str | None = None, limit: Limit = 20,
               order: Annotated[str, Parameter(pattern="^(asc|desc)$")] = "desc") -> dict[str, Any]:
        with org_repo(app_state(request), principal) as repo:
            rows, has_more = repo.list_events(repo.get_job(job_id), after=_event_cursor(after), limit=limit,
                                              ascending=order == "asc")
            return {"object": "list", "data": [present_event(e) for e in rows], "has_more": has_more}

    @get("/{job_id:str}/checkpoints", sync_to_thread=True, summary="List a job's checkpoints")
    def checkpoints(self, request: Request, principal: Principal, job_id: str,  # type: ignore[type-arg]
                    after: str | None = None, limit: Limit = 10) -> dict[str, Any]:
        with org_repo(app_state(request), principal) as repo:
            job = repo.get_job(job_id)
            rows, has_more = repo.list_checkpoints(job, after=after, limit=limit)
            data = [{
                "id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": int(c.created_at),
                "fine_tuned_model_checkpoint": f"{job.fine_tuned_model or 'ft:' + job.model + ':' + job.id}"
                                               f":ckpt-step-{c.step_number}",
                "fine_tuning_job_id": job.id, "step_number": c.step_number,
                "metrics": checkpoint_metrics(c.step_number, c.metrics or {}),
            } for c in rows]
            return {"object": "list", "data": data, "has_more": has_more}

    @get("/{job_id:str}/checkpoints/{checkpoint_id:str}/content", sync_to_thread=True,
         summary="Download a checkpoint's adapter (.tar.gz)", media_type="application/gzip")
    def checkpoint_content(self, request: Request, principal: Principal, job_id: str,  # type: ignore[type-arg]
                           checkpoint_id: str) -> Stream:
        state = app_state(request)
        with org_repo(state, principal) as repo:
            ckpt = repo.get_checkpoint(repo.get_job(job_id), checkpoint_id)
            key, step = ckpt.storage_key, ckpt.step_number
        return _stream(state, key, f"{job_id}-step-{step}.tar.gz")

    @get("/{job_id:str}/metrics", sync_to_thread=True, summary="A job's metric series")
    def metrics(self, request: Request, principal: Principal, job_id: str,  # type: ignore[type-arg]
                step_from: Annotated[int | None, Parameter(ge=0)] = None,
                step_to: Annotated[int | None, Parameter(ge=0)] = None,
                name: list[str] | None = None) -> dict[str, Any]:
        with org_repo(app_state(request), principal) as repo:
            points = repo.list_metrics(repo.get_job(job_id), step_from=step_from, step_to=step_to, names=name)
            return {"object": "list",
                    "data": [{"step": p.step, "name": p.name, "value": p.value} for p in points]}

    @get("/{job_id:str}/adapter", sync_to_thread=True, summary="Download the final adapter (.tar.gz)",
         media_type="application/gzip")
    def adapter(self, request: Request, principal: Principal, job_id: str) -> Stream:  # type: ignore[type-arg]
        state = app_state(request)
        with org_repo(state, principal) as repo:
            job = repo.get_job(job_id)
            if job.status != "succeeded" or not job.adapter_key:
                raise APIError(409, f"job {job_id} has no final adapter (status: {job.status})",
                               code="adapter_not_ready")
            key = job.adapter_key
        return _stream(state, key, f"{job_id}-adapter.tar.gz")


#: OpenAI's checkpoint metric names (``fine_tuning.job.checkpoint.metrics``) → the recipes' names
OPENAI_CHECKPOINT_METRICS = {"train_loss": "loss", "train_mean_token_accuracy": "mean_token_accuracy",
                             "valid_loss": "eval/loss", "valid_mean_token_accuracy": "eval/mean_token_accuracy",
                             "full_valid_loss": "eval/loss",
                             "full_valid_mean_token_accuracy": "eval/mean_token_accuracy"}


def checkpoint_metrics(step: int, stored: dict[str, float]) -> dict[str, float]:
    """A checkpoint's metrics under OpenAI's names where it has one (``valid_*`` = ``full_valid_*``:
    alignd evaluates the whole validation file), then the recipe's own names."""
    named = {name: stored[ours] for name, ours in OPENAI_CHECKPOINT_METRICS.items() if ours in stored}
    return {"step": float(step), **named, **stored}
