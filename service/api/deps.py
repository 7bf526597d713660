"""Request-scoped pieces the controllers share: the app state, the caller, and a unit of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from litestar import Request

from service.auth import Principal, authenticate
from service.db.engine import session_scope
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.state import AppState


def app_state(request: Request) -> AppState:  # type: ignore[type-arg]
    return request.app.state.alignd  # type: ignore[no-any-return]


def provide_principal(request: Request) -> Principal:  # type: ignore[type-arg]
    state = app_state(request)
    with session_scope(state.sessions) as session:
        principal = authenticate(session, request.headers.get("authorization"))
    if principal is None:
        raise APIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return principal


@contextmanager
def org_repo(state: AppState, principal: Principal) -> Iterator[OrgRepository]:
    with session_scope(state.sessions) as session:
        yield OrgRepository(session, principal.organization_id)
