"""Creating, presenting and cancelling jobs; the rules a job must pass before it is queued."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import msgspec

from service.datasets.validation import compatible_kinds
from service.db.models import Job, JobEvent, new_id, now
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.jobs.chaining import validate_generate_preferences, validate_ppo
from service.jobs.planning import JobPlan, apply_plan, plan_job, plan_message
from service.jobs.reinforcement import validate_reinforcement
from service.jobs.retention import validate_retention
from service.jobs.spec import (
    IMPLEMENTED_METHODS,
    SELECTION_METRICS,
    CommonHyperparameters,
    JobCreate,
    Method,
    ReinforcementHyperparameters,
    to_builtins,
)
from service.limits import check_job_limits
from service.model_registry import is_base_model
from service.settings import Settings
from service.storage import ObjectStore, open_store

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def request_hash(body: Any) -> str:
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()


def method_dict(method: Method) -> dict[str, Any]:
    """Only the selected block, defaults filled in: what the job will actually run with."""
    body = getattr(method.normalized(), method.type)
    return {"type": method.type, method.type: to_builtins(body)}


def validate_model(repo: OrgRepository, settings: Settings, model: str) -> None:
    if is_base_model(model, settings):
        return
    parent = repo.job_by_fine_tuned_model(model) if model.startswith("ft:") else None
    if parent is None:
        raise APIError(400, f"model '{model}' is neither a base model nor one of your fine-tuned models",
                       code="model_not_found", param="model")
    if parent.status != "succeeded":
        raise APIError(400, f"model '{model}' comes from job {parent.id}, which has not succeeded",
                       code="model_not_ready", param="model")


def validate_file(repo: OrgRepository, file_id: str, param: str, method_type: str) -> None:
    f = repo.get_file(file_id, param)
    if f.status != "processed":
        raise APIError(400, f"{param} '{file_id}' is invalid: {f.status_details or f.status}",
                       code="invalid_training_file" if param == "training_file" else "invalid_validation_file",
                       param=param)
    allowed = {k.value for k in compatible_kinds(method_type)}
    if f.kind not in allowed:
        raise APIError(400, f"{param} '{file_id}' holds {f.kind} data; method '{method_type}' needs "
                       f"{' or '.join(sorted(allowed))} data", code="invalid_file_format", param=param)


def create_job(repo: OrgRepository, settings: Settings, spec: JobCreate, store: ObjectStore | None = None) -> Job:
    check_job_limits(repo, settings.limits)
    plan = check_job(repo, settings, spec, store)
    job = Job(
        id=new_id("ftjob"), organization_id=repo.org, model=spec.model, training_file=spec.training_file,
        validation_file=spec.validation_file, suffix=spec.suffix,
        seed=spec.seed if spec.seed is not None else random.randrange(2**31),
        job_metadata=spec.metadata, method=method_dict(spec.method),
        training_type=to_builtins(spec.training_type), status="validating_files",
    )
    apply_plan(job, plan)
    repo.add(job)
    repo.add(JobEvent(job_id=job.id, message=f"Validated training file: {spec.training_file}"))
    repo.add(JobEvent(job_id=job.id, message=plan_message(plan),
                      data={"estimated_memory_bytes": job.estimated_memory_bytes, "queue": job.queue,
                            **plan.resources}))
    hp = spec.method.hyperparameters()
    if isinstance(hp, ReinforcementHyperparameters):
        for note in hp.ignored_settings():
            repo.add(JobEvent(job_id=job.id, level="warn", message=note))
    job.status = "queued"
    job.enqueued_at = now()
    repo.add(JobEvent(job_id=job.id, message="Job queued"))
    return job


def check_job(repo: OrgRepository, settings: Settings, spec: JobCreate, store: ObjectStore | None = None) -> JobPlan:
    """Every rule a job must pass, then its memory estimate and queue (what ``dry_run`` answers with).

    ``store`` (the app's object store) is read only for reinforcement jobs, whose grader's ``{{item.x}}``
    fields are checked against every line of the files."""
    method_type = spec.method.type
    if method_type not in IMPLEMENTED_METHODS:
        raise APIError(400, f"method '{method_type}' is not available in this release "
                       f"(available: {', '.join(sorted(IMPLEMENTED_METHODS))})",
                       code="unsupported_method", param="method.type")
    other = [name for name in ("supervised", "dpo", "reward_model", "ppo", "reinforcement", "generate_preferences")
             if name != method_type and getattr(spec.method, name) is not None]
    if other:
        raise APIError(400, f"method.{other[0]} given but method.type is '{method_type}'",
                       code="invalid_request", param=f"method.{other[0]}")
    if method_type == "reinforcement" and spec.method.reinforcement is None:
        raise APIError(400, "a reinforcement job needs method.reinforcement.grader (OpenAI's grader object)",
                       code="invalid_request", param="method.reinforcement.grader")
    hp = spec.method.hyperparameters()
    if getattr(hp, "label_smoothing", 0.0) and getattr(hp, "loss_type", "robust") != "robust":
        raise APIError(400, "label_smoothing applies only to loss_type 'robust'", code="invalid_request",
                       param=f"method.{method_type}.hyperparameters.label_smoothing")
    validate_selection(spec, method_type, hp)
    validate_model(repo, settings, spec.model)
    if method_type == "ppo":
        validate_ppo(repo, settings, spec)
    if method_type == "generate_preferences":
        validate_generate_preferences(repo, settings, spec)
    validate_file(repo, spec.training_file, "training_file", method_type)
    if spec.validation_file:
        validate_file(repo, spec.validation_file, "validation_file", method_type)
    if method_type == "reinforcement":
        validate_reinforcement(repo, settings, spec, store or open_store(settings.storage))
    if method_type == "dpo":
        validate_retention(repo, settings, spec, store or open_store(settings.storage))
    return plan_job(repo, settings, spec)


def pause_job(repo: OrgRepository, job: Job) -> Job:
    """Queued jobs pause at once; a running job checkpoints first (the worker sets ``paused``)."""
    if job.status == "queued":
        job.status = "paused"
        repo.add(JobEvent(job_id=job.id, message="Job paused before it started"))
    elif job.status == "running":
        job.pause_requested = True
        repo.add(JobEvent(job_id=job.id, message="Pause requested: the job will checkpoint and pause"))
    elif job.status != "paused":
        raise APIError(409, f"job {job.id} is {job.status} and cannot be paused", code="job_not_pausable",
                       param="id")
    return job


def resume_job(repo: OrgRepository, job: Job) -> Job:
    if job.status != "paused":
        raise APIError(409, f"job {job.id} is {job.status}, not paused", code="job_not_paused", param="id")
    job.status, job.pause_requested, job.enqueued_at = "queued", False, now()
    repo.add(JobEvent(job_id=job.id, message="Job resumed: queued to continue from its latest checkpoint"))
    return job


def cancel_job(repo: OrgRepository, job: Job) -> Job:
    if job.status in TERMINAL:
        raise APIError(409, f"job {job.id} is already {job.status}", code="job_not_cancellable", param="id")
    # The worker polls cancel_requested between steps and stops within one step.
    job.cancel_requested, job.pause_requested = True, False
    job.status = "cancelled"
    job.finished_at = now()
    repo.add(JobEvent(job_id=job.id, message="Job cancelled by request"))
    # Written (and the row locked) first, then the step read: the answer's progress is where the job
    # stood when the cancel landed; its worker trains at most the one step then in flight.
    repo.session.refresh(job, attribute_names=["step"])
    return job


def present_job(job: Job) -> dict[str, Any]:
    method = job.method or {}
    hyper = (method.get(method.get("type", ""), {}) or {}).get("hyperparameters", {})
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model,
        "created_at": int(job.created_at),
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.organization_id,
        "status": job.status,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "method": method,
        "training_type": job.training_type,
        "hyperparameters": hyper,
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "seed": job.seed,
        "suffix": job.suffix,
        "metadata": job.job_metadata,
        "estimated_finish": int(job.estimated_finish) if job.estimated_finish else None,
        "progress": {"step": job.step, "total_steps": job.total_steps},
        "estimated_memory_bytes": job.estimated_memory_bytes,
        "resources": {**(job.resources or {"gpus": 1}), "queue": job.queue},
        # files a job produced (generate_preferences: its preference file), as OpenAI's jobs list them
        "result_files": list(job.result_files or []),
    }


def present_event(e: JobEvent) -> dict[str, Any]:
    return {"id": f"ftevent-{e.seq}", "object": "fine_tuning.job.event", "created_at": int(e.created_at),
            "level": e.level, "message": e.message, "type": e.type, "data": e.data}


#: methods whose recipes evaluate a validation file with ``eval/loss``
EVALUATED_METHODS = ("supervised", "dpo", "reward_model")


def validate_selection(spec: JobCreate, method_type: str, hp: CommonHyperparameters) -> None:
    """``checkpoint_selection: best`` and ``early_stopping`` follow an evaluation metric: they need a
    method that evaluates and a ``validation_file``; the metric must be one selection knows."""
    prefix = f"method.{method_type}.hyperparameters"
    fields = [name for name, on in (("checkpoint_selection", hp.checkpoint_selection == "best"),
                                    ("early_stopping", hp.early_stopping is not None)) if on]
    for name in fields:
        if method_type not in EVALUATED_METHODS:
            raise APIError(400, f"{name} needs an evaluation, which method '{method_type}' does not run",
                           code="invalid_request", param=f"{prefix}.{name}")
        if not spec.validation_file:
            raise APIError(400, f"{name} needs a validation_file to evaluate on", code="invalid_request",
                           param=f"{prefix}.{name}")
    stopping = hp.early_stopping
    if stopping is not None:
        if stopping.metric not in SELECTION_METRICS:
            raise APIError(400, f"early_stopping.metric '{stopping.metric}' is not one of "
                                f"{', '.join(SELECTION_METRICS)}", code="invalid_request",
                           param=f"{prefix}.early_stopping.metric")
        if stopping.metric == "eval/retention" and not getattr(hp, "retention_file", None):
            raise APIError(400, "early_stopping.metric 'eval/retention' needs a retention_file",
                           code="invalid_request", param=f"{prefix}.early_stopping.metric")
        if stopping.patience < 1:
            raise APIError(400, "early_stopping.patience must be at least 1", code="invalid_request",
                           param=f"{prefix}.early_stopping.patience")
