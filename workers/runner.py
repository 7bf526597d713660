"""A claimed job's life in one process: build its context, run its recipe, record how it ended.

``tasks.py`` claims the job (or ``launch.py`` starts N ranks that each call :func:`run_claimed`);
everything between the claim and the end state is here:

* :func:`build_context` does every database read a recipe needs — the job row, its files' storage
  keys, the organization's name, the latest checkpoint, the base model's ``ft:`` lineage and the
  model references the recipe declares (a PPO job's ``reward_model``, a judge), each checked again
  here rather than trusted from creation time;
* the recipe runs (``setup``, ``train``, ``cleanup``) and talks back only through the ``Reporter``;
* the end state is recorded: paused (with the step to resume from), succeeded (the fine-tuned model's
  name, the adapter, or the result file a ``generate_preferences`` job produced, which is registered
  here as a file object of the job's organization), or failed with a readable error — an
  out-of-memory names the estimate and the device's memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from service.db.engine import session_scope
from service.db.repositories import JobLost, JobRunRepository, OrgRepository
from service.errors import APIError
from service.files import create_file, present_file
from service.jobs.spec import method_from_row, training_type_from_row
from service.state import AppState
from workers import recipes
from workers.context import JobContext, JobFailure, ModelRef, TrainResult
from workers.reporting import Reporter

log = logging.getLogger("alignd.worker")


def fine_tuned_model_name(ctx: JobContext) -> str:
    return f"ft:{ctx.base_model}:{ctx.organization_name}:{ctx.suffix or ''}:{ctx.job_id}"


def _reference(repo: JobRunRepository, org: str, field: str, name: str, param: str, kind: str) -> ModelRef:
    job = repo.parent_by_fine_tuned_model(org, name)
    if job is None or not job.adapter_key or job.status != "succeeded":
        raise JobFailure(f"{kind}_not_found", f"{field} '{name}' is not available", param)
    method_type = str((job.method or {}).get("type"))
    if method_type != kind:
        raise JobFailure(f"{kind}_not_a_{kind}", f"{field} '{name}' is not a {kind.replace('_', ' ')}", param)
    chain = repo.lineage(org, job.model)
    if chain.missing:
        raise JobFailure(f"{kind}_not_found", f"the base '{chain.missing}' of {field} '{name}' is not available",
                         param)
    return ModelRef(name, job.id, method_type, chain.base, chain.adapter_keys, job.adapter_key)


def build_context(state: AppState, job_id: str, reporter: Reporter, workdir: Path) -> tuple[JobContext, Any]:
    """The job's context (all database reads done) and its recipe class."""
    with session_scope(state.sessions) as session:
        repo = JobRunRepository(session, job_id)
        job = repo.job()
        method = method_from_row(job.method)
        recipe = recipes.recipe_class(method.type)
        if recipe is None:
            raise JobFailure("unsupported_method", f"this worker has no recipe for method '{method.type}'",
                             "method.type")
        chain = repo.lineage(job.organization_id, job.model)
        if chain.missing:
            raise JobFailure("model_not_found", f"model '{chain.missing}' is not available", "model")
        references = {}
        for field, (name, param, kind) in recipes.model_references(recipe, method.hyperparameters()).items():
            if name:
                references[field] = _reference(repo, job.organization_id, field, name, param, kind)
        latest = repo.latest_checkpoint() if recipes.resumes(recipe) else None
        validation_key = repo.file(job.validation_file).storage_key if job.validation_file else None
        retention_file = getattr(method.hyperparameters(), "retention_file", None)
        file_keys = {"retention_file": repo.file(retention_file).storage_key} if retention_file else {}
        ctx = JobContext(
            resume_from=(latest.step_number, latest.storage_key) if latest else None,
            job_id=job.id, organization_name=repo.organization_name(job.organization_id), model=job.model,
            base_model=chain.base, parent_adapter_keys=chain.adapter_keys, method=method,
            training_type=training_type_from_row(job.training_type), seed=job.seed, suffix=job.suffix,
            training_file_key=repo.file(job.training_file).storage_key, validation_file_key=validation_key,
            settings=state.settings, store=state.store, reporter=reporter, workdir=workdir, references=references,
            attempt=reporter.attempt or 0,
            strategy=str((job.resources or {}).get("strategy") or "single"), file_keys=file_keys,
        )
    if not recipes.resumes(recipe):
        reporter.restart()
    return ctx, recipe


# --------------------------------------------------------------------------- end states


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def out_of_memory_error(state: AppState, job_id: str) -> dict[str, Any]:
    """What a user can act on: how much the job was estimated to need and what the device has."""
    import psutil
    import torch

    with session_scope(state.sessions) as session:
        estimate = JobRunRepository(session, job_id).job().estimated_memory_bytes
    if torch.cuda.is_available():
        device = f"GPU {torch.cuda.get_device_name()}"
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        device, capacity = "host", psutil.virtual_memory().total
    needed = f"the job was estimated to need {_gib(estimate)}" if estimate else "no estimate was recorded"
    return {"code": "out_of_memory", "param": "method",
            "message": f"ran out of memory on the {device} ({_gib(capacity)}); {needed}. Lower batch_size or "
                       "max_length, set gradient_checkpointing, or use LoRA; POST the job with "
                       "\"dry_run\": true to see the estimate."}


def fail(reporter: Reporter, state: AppState, job_id: str, error: dict[str, Any]) -> None:
    reporter.event(f"Job failed: {error['message']}", level="error", data={"code": error["code"]})
    if not reporter.is_main:  # under accelerate launch, rank 0 records the end state
        return
    with session_scope(state.sessions) as session:
        JobRunRepository(session, job_id, reporter.attempt).finish("failed", error=error)


def register_result_file(state: AppState, job_id: str, path: Path, filename: str, attempt: int | None) -> str:
    """A job's output file as a normal file object of its organization (validated and analysed); only
    while this attempt still owns the job (a fenced-out worker registers nothing)."""
    with session_scope(state.sessions) as session:
        repo = JobRunRepository(session, job_id, attempt)
        repo.fence()
        org = repo.job().organization_id
        try:
            with path.open("rb") as stream:
                row = create_file(OrgRepository(session, org), state.store, state.settings.limits,
                                  filename=filename, purpose="fine-tune", stream=stream)
        except APIError as exc:
            raise JobFailure("output_file_error", f"the result file could not be stored: {exc}") from exc
        file = present_file(row)
    if file["status"] != "processed":
        raise JobFailure("output_file_error", f"the result file {file['id']} did not validate: "
                         f"{file['status_details']}")
    return str(file["id"])


def _record_success(state: AppState, ctx: JobContext, result: TrainResult, reporter: Reporter) -> None:
    files: list[str] | None = None
    name: str | None = None
    summary = dict(result.summary or {})
    if result.output_path is not None:  # a job that produced a file (generate_preferences) made no model
        file_id = register_result_file(state, ctx.job_id, result.output_path,
                                       result.output_filename or result.output_path.name, reporter.attempt)
        files = [file_id]
        summary["result_files"] = files
        reporter.event(f"Result file created: {file_id}", data={"result_files": files, "file": file_id})
    else:
        name = fine_tuned_model_name(ctx)
        reporter.event(f"New fine-tuned model created: {name}", data={"fine_tuned_model": name})
    reporter.event("The job has successfully completed", data=summary)
    with session_scope(state.sessions) as session:
        JobRunRepository(session, ctx.job_id, reporter.attempt).finish(
            "succeeded", fine_tuned_model=name, adapter_key=result.adapter_key, result_files=files)


def _record_pause(state: AppState, job_id: str, reporter: Reporter) -> None:
    with session_scope(state.sessions) as session:
        repo = JobRunRepository(session, job_id, reporter.attempt)
        repo.mark_paused()
        step = repo.job().step
    reporter.event(f"Job paused at step {step}; resume continues from this checkpoint", data={"step": step})


#: What a rank of a multi-node job returns when it lost a peer: no end state was recorded, the
#: supervisor restarts the attempt from the latest checkpoint.
INTERRUPTED = "interrupted"


def lost_peer(exc: BaseException) -> bool:
    """A rank of a multi-node job (``workers.multinode``) failed because another rank or node went away.

    Such an attempt is the supervisor's to restart (``JobSetSupervisor``), so the job must not be
    failed here. Single-node jobs keep failing with the error, as before."""
    from workers.distributed import lost_connection
    from workers.jobset import NODE_RANK_ENV

    return NODE_RANK_ENV in os.environ and lost_connection(exc)


def run_claimed(state: AppState, job_id: str, reporter: Reporter) -> str:
    """Run a claimed job to an end state; returns the status it ended in."""
    workdir = Path(tempfile.mkdtemp(prefix=f"alignd-{job_id}-"))
    recipe: recipes.Recipe | None = None
    try:
        ctx, recipe_class = build_context(state, job_id, reporter, workdir)
        recipe = recipes.build(recipe_class, ctx)
        recipe.setup()
        result = recipe.train()
        if reporter.is_main and result.status == "preempted":
            from workers.shutdown import hand_back

            return hand_back(state, reporter)
        if reporter.is_main and result.status == "paused":
            _record_pause(state, job_id, reporter)
        if reporter.is_main and result.status == "succeeded":
            _record_success(state, ctx, result, reporter)
        return result.status
    except JobLost:
        raise  # the task boundary logs it; nothing may be written for a job this worker lost
    except JobFailure as failure:
        fail(reporter, state, job_id, failure.as_error())
        return "failed"
    except Exception as exc:  # noqa: BLE001 - every failure must end the job with a readable error
        log.exception("job %s failed", job_id)
        if lost_peer(exc):
            return INTERRUPTED
        if is_out_of_memory(exc):
            fail(reporter, state, job_id, out_of_memory_error(state, job_id))
        else:
            fail(reporter, state, job_id, {"code": "training_error", "param": None,
                                           "message": f"{type(exc).__name__}: {exc}"[:1000]})
        return "failed"
    finally:
        if recipe is not None:
            recipe.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
