"""``graders/validate`` and ``graders/run``: check a grader, and grade one sample with it.

Graders that need no model run in the API process: string and similarity checks directly, python
graders in the bubblewrap sandbox (:mod:`service.graders.sandbox`). A grader that needs a model
(``score_model``/``label_model``, alone or inside a ``multi``) — or a python grader where this process
cannot sandbox (no bubblewrap, not started as root) — is sent to a worker as ``alignd.grade`` and the
request waits for the result: 503 with ``Retry-After`` when no worker starts it within
``ALIGND_GRADER_PICKUP_TIMEOUT``.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from msgspec import Struct

from service.errors import APIError
from service.graders import Sandbox, grade, make_sample, uses_model, uses_python
from service.graders.results import GraderErrors, GradeResult
from service.graders.types import Grader
from service.jobs.reinforcement import check_grader
from service.queue import NoWorkerAvailable, run_grade_task
from service.settings import GraderSettings, Settings
from service.state import AppState

log = logging.getLogger("alignd.graders")

RETRY_AFTER_SECONDS = "30"


class GraderValidateRequest(Struct, forbid_unknown_fields=True):
    """OpenAI's ``POST /fine_tuning/alpha/graders/validate`` body."""

    grader: Grader


class GraderRunRequest(Struct, forbid_unknown_fields=True):
    """OpenAI's ``POST /fine_tuning/alpha/graders/run`` body: ``model_sample`` fills the ``sample`` namespace
    (``output_json`` too when it is valid JSON), ``item`` the ``item`` namespace."""

    grader: Grader
    model_sample: str
    item: Any = None


@cache
def _sandbox(limits: GraderSettings) -> Sandbox:
    return Sandbox.from_settings(limits)


def sandbox_for(settings: Settings) -> Sandbox:
    return _sandbox(settings.graders)


def validate(settings: Settings, grader: Grader) -> dict[str, Any]:
    check_grader(grader, settings, "grader")
    return {"grader": grader}


def run(state: AppState, request: GraderRunRequest) -> dict[str, Any]:
    settings = state.settings
    check_grader(request.grader, settings, "grader")
    item = request.item if request.item is not None else {}
    sandbox = sandbox_for(settings)
    if uses_model(request.grader) or (uses_python(request.grader) and sandbox.unavailable() is not None):
        return _on_worker(state, request, item)
    result = grade(request.grader, make_sample(request.model_sample), item, sandbox=sandbox,
                   timeout=settings.graders.sample_timeout)
    return result.to_dict()


def _on_worker(state: AppState, request: GraderRunRequest, item: Any) -> dict[str, Any]:
    from msgspec import to_builtins

    settings = state.settings.graders
    queue = settings.queue or state.settings.placement.queues[0].name
    kwargs = {"grader": to_builtins(request.grader), "model_sample": request.model_sample, "item": item}
    try:
        body = run_grade_task(state.celery, queue, kwargs, pickup_timeout=settings.pickup_timeout,
                              run_timeout=settings.run_timeout)
    except NoWorkerAvailable as exc:
        raise APIError(503, f"no worker is free to run this grader's model ({exc}); retry later",
                       code="no_worker_available", headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    if body is None:
        return _flagged(request.grader, GraderErrors(
            unresponsive_reward_error=True,
            model_grader_server_error_details=f"the worker did not finish within {settings.run_timeout:g} s"))
    try:
        return GradeResult.from_dict(body).to_dict()
    except Exception:  # noqa: BLE001 - a malformed task result is the worker's fault, flagged not raised
        log.error("malformed grade task result: %r", str(body)[:500])
        return _flagged(request.grader, GraderErrors(model_grader_server_error=True,
                                                     model_grader_server_error_details="the worker failed"))


def _flagged(grader: Grader, errors: GraderErrors) -> dict[str, Any]:
    from service.graders.results import GradeMetadata

    return GradeResult(reward=0.0, metadata=GradeMetadata(name=grader.display_name, type=grader.kind,
                                                          errors=errors)).to_dict()
