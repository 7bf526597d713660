"""``Idempotency-Key`` for creates: same key + same body → the first response; different body → 409.

The key is claimed *before* the object is created, in its own transaction, so concurrent duplicates
cannot both create: the losers wait for the winner's object and answer with it. A failed create
releases its claim, so a corrected retry with the same key goes through. Keys expire after 24 h.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from service.api.deps import org_repo
from service.auth import Principal
from service.db.models import IdempotencyKey, now
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.state import AppState

TTL_SECONDS = 24 * 3600
WAIT_SECONDS = 120.0

Create = Callable[[OrgRepository], tuple[str, dict[str, Any]]]
Load = Callable[[OrgRepository, str], dict[str, Any]]


def _mismatch() -> APIError:
    return APIError(409, "Idempotency-Key was already used with a different request body",
                    code="idempotency_key_reused", param="Idempotency-Key")


def _claim(state: AppState, principal: Principal, scope: str, key: str, digest: str) -> bool:
    try:
        with org_repo(state, principal) as repo:
            repo.session.execute(delete(IdempotencyKey).where(
                IdempotencyKey.organization_id == repo.org, IdempotencyKey.scope == scope,
                IdempotencyKey.key == key, IdempotencyKey.created_at < now() - TTL_SECONDS))
            repo.session.add(IdempotencyKey(organization_id=repo.org, scope=scope, key=key,
                                            request_hash=digest, object_id=None))
        return True
    except IntegrityError:
        return False


def run_idempotent(state: AppState, principal: Principal, scope: str, key: str | None, digest: str,
                   create: Create, load: Load) -> tuple[dict[str, Any], bool]:
    """Returns (response body, created now?)."""
    if not key:
        with org_repo(state, principal) as repo:
            return create(repo)[1], True
    deadline = time.monotonic() + WAIT_SECONDS
    while not _claim(state, principal, scope, key, digest):
        with org_repo(state, principal) as repo:
            seen = repo.idempotency(scope, key)
            if seen is not None:
                if seen.request_hash != digest:
                    raise _mismatch()
                if seen.object_id:
                    return load(repo, seen.object_id), False
        if time.monotonic() > deadline:
            raise APIError(409, "a request with this Idempotency-Key is still in progress",
                           code="idempotency_key_in_progress", param="Idempotency-Key")
        time.sleep(0.05)
    try:
        with org_repo(state, principal) as repo:
            object_id, body = create(repo)
            repo.session.execute(update(IdempotencyKey).where(
                IdempotencyKey.organization_id == repo.org, IdempotencyKey.scope == scope,
                IdempotencyKey.key == key).values(object_id=object_id))
        return body, True
    except BaseException:
        with org_repo(state, principal) as repo:
            repo.session.execute(delete(IdempotencyKey).where(
                IdempotencyKey.organization_id == repo.org, IdempotencyKey.scope == scope,
                IdempotencyKey.key == key))
        raise
