"""``/v1/fine_tuning/alpha/graders``: validate and run graders, as OpenAI's SDK calls them.

``client.fine_tuning.alpha.graders.validate(grader=...)`` and ``.run(grader=..., model_sample=...,
item=...)``. Both are organization-scoped (bearer key) and rate-limited per organization
(``ALIGND_GRADER_REQUESTS_PER_MINUTE``, validate and run together).
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post

from service import grader_runs
from service.api.deps import app_state, org_repo
from service.auth import Principal
from service.grader_runs import GraderRunRequest, GraderValidateRequest
from service.limits import check_request_rate

RATE_SCOPE = "graders"


class GradersController(Controller):
    path = "/v1/fine_tuning/alpha/graders"
    tags = ["graders"]

    def _count(self, request: Request, principal: Principal) -> None:  # type: ignore[type-arg]
        state = app_state(request)
        with org_repo(state, principal) as repo:
            check_request_rate(repo, RATE_SCOPE, state.settings.graders.requests_per_minute)

    @post("/validate", status_code=200, sync_to_thread=True, summary="Validate a grader")
    def validate(self, request: Request, principal: Principal,  # type: ignore[type-arg]
                 data: GraderValidateRequest) -> dict[str, Any]:
        self._count(request, principal)
        return grader_runs.validate(app_state(request).settings, data.grader)

    @post("/run", status_code=200, sync_to_thread=True,
          summary="Run a grader on one model sample and dataset item")
    def run(self, request: Request, principal: Principal,  # type: ignore[type-arg]
            data: GraderRunRequest) -> dict[str, Any]:
        self._count(request, principal)
        return grader_runs.run(app_state(request), data)
