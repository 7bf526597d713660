"""``/v1/models``: the base registry plus this organization's fine-tuned models."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get

from service.api.deps import app_state, org_repo
from service.auth import Principal
from service.model_registry import known_base_models


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get("/", sync_to_thread=True, summary="List models")
    def list_models(self, request: Request, principal: Principal) -> dict[str, Any]:  # type: ignore[type-arg]
        state = app_state(request)
        data: list[dict[str, Any]] = [
            {"id": name, "object": "model", "created": 0, "owned_by": "alignd"}
            for name in known_base_models(state.settings)
        ]
        with org_repo(state, principal) as repo:
            data += [{"id": j.fine_tuned_model, "object": "model", "created": int(j.finished_at or j.created_at),
                      "owned_by": principal.organization_name, "job_id": j.id,
                      "method": j.method.get("type")} for j in repo.fine_tuned_models()]
        return {"object": "list", "data": data}
