"""The ``alignd.train`` task: claim the job, build its context from the database, run its recipe.

The task takes only a job id and reloads everything, so a redelivered or duplicated message is
harmless: the claim (queued → running) lets exactly one delivery run.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from service.db.engine import make_engine, make_session_factory, session_scope
from service.db.repositories import JobLost, JobRunRepository
from service.jobs.spec import method_from_row, training_type_from_row
from service.queue import TRAIN_TASK
from service.settings import Settings
from service.state import AppState
from workers.celery_app import app, settings
from workers.context import JobContext, JobFailure, TrainResult
from workers.metrics_server import serve_worker_metrics
from workers.reporting import Heartbeat, Reporter

log = logging.getLogger("alignd.worker")


class Recipe(Protocol):
    def setup(self) -> None: ...
    def train(self) -> TrainResult: ...
    def cleanup(self) -> None: ...


# method type -> "module:Class"; imported lazily so a worker loads only the recipe it runs.
RECIPES: dict[str, str] = {
    "dpo": "workers.recipes.dpo:DPORecipe",
    "supervised": "workers.recipes.sft:SFTRecipe",
    "reward_model": "workers.recipes.reward_model:RewardModelRecipe",
    "ppo": "workers.recipes.ppo:PPORecipe",
    "generate_preferences": "workers.recipes.generate_preferences:GeneratePreferencesRecipe",
}


def recipe_for(method_type: str, ctx: JobContext) -> Recipe:
    target = RECIPES.get(method_type)
    if target is None:
        raise JobFailure("unsupported_method", f"this worker has no recipe for method '{method_type}'",
                         "method.type")
    module_name, _, class_name = target.partition(":")
    recipe_class = getattr(importlib.import_module(module_name), class_name)
    return recipe_class(ctx)  # type: ignore[no-any-return]


_STATES: dict[str, AppState] = {}


def worker_state(settings: Settings) -> AppState:
    """One engine and store per settings for the life of the worker process."""
    key = repr(settings)
    if key not in _STATES:
        _STATES[key] = AppState(settings)
    return _STATES[key]


@app.task(name=TRAIN_TASK, acks_late=True)
def train(job_id: str) -> None:
    run_job(job_id, settings, worker=train.request.hostname)


def _context(state: AppState, job_id: str, reporter: Reporter, workdir: Path) -> JobContext:
    with session_scope(state.sessions) as session:
        repo = JobRunRepository(session, job_id)
        job = repo.job()
        base, adapters = job.model, list[str]()
        while base.startswith("ft:"):
            parent = repo.parent_by_fine_tuned_model(job.organization_id, base)
            if parent is None or not parent.adapter_key:
                raise JobFailure("model_not_found", f"model '{base}' is not available", "model")
            adapters.insert(0, parent.adapter_key)
            base = parent.model
        validation_key = repo.file(job.validation_file).storage_key if job.validation_file else None
        latest = repo.latest_checkpoint()
        return JobContext(
            resume_from=(latest.step_number, latest.storage_key) if latest else None,
            job_id=job.id, organization_name=repo.organization_name(job.organization_id), model=job.model,
            base_model=base, parent_adapter_keys=adapters, method=method_from_row(job.method),
            training_type=training_type_from_row(job.training_type), seed=job.seed, suffix=job.suffix,
            training_file_key=repo.file(job.training_file).storage_key, validation_file_key=validation_key,
            settings=state.settings, store=state.store, reporter=reporter, workdir=workdir,
            attempt=reporter.attempt or 0,
        )


def fine_tuned_model_name(ctx: JobContext) -> str:
    return f"ft:{ctx.base_model}:{ctx.organization_name}:{ctx.suffix or ''}:{ctx.job_id}"


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


def _fail(reporter: Reporter, state: AppState, job_id: str, error: dict[str, Any]) -> None:
    reporter.event(f"Job failed: {error['message']}", level="error", data={"code": error["code"]})
    if not reporter.is_main:  # under accelerate launch, rank 0 records the end state
        return
    with session_scope(state.sessions) as session:
        JobRunRepository(session, job_id, reporter.attempt).finish("failed", error=error)


def run_job(job_id: str, settings: Settings, worker: str | None = None) -> str:
    """Run one job to an end state; returns the status it ended in (or 'skipped').

    ``worker`` (the Celery node name) is recorded on the job: that worker's ``/metrics`` shows it.
    A job with ``resources.gpus`` > 1 runs under ``accelerate launch`` (``workers.launch``)."""
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
            if int(resources.get("gpus") or 1) > 1:
                from workers.launch import supervise

                return supervise(state, job_id, reporter, resources)
            return _run_claimed(state, job_id, reporter)
    except JobLost:
        # Fenced out: the reconciler handed the job to another worker while this one was cut off or
        # frozen. Its training has stopped; it writes nothing more and leaves the job to the new owner.
        log.warning("job %s: this worker lost the job (attempt %d was superseded); stopped its training "
                    "and left it to the worker that owns it now", job_id, attempt)
        return "lost"


def _run_claimed(state: AppState, job_id: str, reporter: Reporter) -> str:
    workdir = Path(tempfile.mkdtemp(prefix=f"alignd-{job_id}-"))
    recipe: Recipe | None = None
    try:
        ctx = _context(state, job_id, reporter, workdir)
        recipe = recipe_for(ctx.method.type, ctx)
        recipe.setup()
        result = recipe.train()
        if result.status == "preempted" and reporter.is_main:
            from workers.shutdown import hand_back

            return hand_back(state, reporter)
        if result.status == "paused" and reporter.is_main:
            with session_scope(state.sessions) as session:
                repo = JobRunRepository(session, job_id, reporter.attempt)
                repo.mark_paused()
                step = repo.job().step
            reporter.event(f"Job paused at step {step}; resume continues from this checkpoint",
                           data={"step": step})
        if result.status == "succeeded" and reporter.is_main:
            # a job that produced a file (generate_preferences) made no model
            name = fine_tuned_model_name(ctx) if result.output_file_id is None else None
            files = [result.output_file_id] if result.output_file_id else None
            if name:
                reporter.event(f"New fine-tuned model created: {name}", data={"fine_tuned_model": name})
            if files:
                reporter.event(f"Result file created: {files[0]}", data={"result_files": files})
            reporter.event("The job has successfully completed", data=result.summary)
            with session_scope(state.sessions) as session:
                JobRunRepository(session, job_id, reporter.attempt).finish(
                    "succeeded", fine_tuned_model=name, adapter_key=result.adapter_key, result_files=files)
        return result.status
    except JobLost:
        raise  # the task boundary (run_job) logs it; nothing may be written for a job this worker lost
    except JobFailure as failure:
        _fail(reporter, state, job_id, failure.as_error())
        return "failed"
    except Exception as exc:  # noqa: BLE001 - every failure must end the job with a readable error
        log.exception("job %s failed", job_id)
        if is_out_of_memory(exc):
            _fail(reporter, state, job_id, out_of_memory_error(state, job_id))
        else:
            _fail(reporter, state, job_id, {"code": "training_error", "param": None,
                                            "message": f"{type(exc).__name__}: {exc}"[:1000]})
        return "failed"
    finally:
        if recipe is not None:
            recipe.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["app", "train", "run_job", "serve_worker_metrics", "make_engine", "make_session_factory"]
