"""The Litestar application: ``create_app(settings)`` wires state, controllers, errors and metrics."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, get
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from sqlalchemy import text

from service.api.deps import app_state, provide_principal
from service.api.files import FilesController
from service.api.graders import GradersController
from service.api.jobs import JobsController
from service.api.models import ModelsController
from service.errors import EXCEPTION_HANDLERS, APIError, document_errors, document_unavailable
from service.limits import upload_size_limit
from service.metrics import make_registry, metrics_endpoint
from service.reconciler import Reconciler
from service.settings import Settings
from service.state import AppState
from service.ui import ui_router

VERSION = "0.1.0"


@get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", include_in_schema=False, sync_to_thread=True)
def readyz(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """Ready when the database answers and the object store is reachable."""
    state = app_state(request)
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        state.store.exists("readyz-probe")
    except Exception as exc:  # noqa: BLE001
        raise APIError(503, f"not ready: {type(exc).__name__}", code="not_ready") from None
    return {"status": "ready"}


def create_app(settings: Settings | None = None, *, migrate: bool = True, reconcile: bool = False) -> Litestar:
    """``reconcile`` starts the reconciler thread (``alignd api``/``serve``); tests drive it directly."""
    state = AppState(settings or Settings.from_env())
    if migrate:
        state.migrate()
    registry, http_metrics = make_registry(state)
    reconciler = Reconciler(state) if reconcile else None
    document_errors(FilesController, JobsController, ModelsController, GradersController)
    document_unavailable(GradersController.run)
    return Litestar(
        on_startup=[reconciler.start] if reconciler else [],
        on_shutdown=[reconciler.stop] if reconciler else [],
        route_handlers=[FilesController, JobsController, ModelsController, GradersController, healthz, readyz,
                        metrics_endpoint, ui_router()],
        dependencies={"principal": Provide(provide_principal, sync_to_thread=True)},
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[http_metrics.middleware, upload_size_limit(state.settings.limits.max_upload_bytes)],
        state=State({"alignd": state, "metrics_registry": registry}),
        request_max_body_size=state.settings.limits.max_json_bytes,
        openapi_config=OpenAPIConfig(
            title="alignd", version=VERSION,
            description="Self-hosted fine-tuning: SFT, reward models, DPO and PPO behind OpenAI's job API.",
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
            security=[{"bearer": []}],
        ),
        on_app_init=[_no_banner],
        debug=False,
    )


def _no_banner(config: AppConfig) -> AppConfig:
    return config
