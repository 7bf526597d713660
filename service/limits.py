"""Limits that protect the service: upload size (enforced while streaming), job-creation and grader rates, and
concurrent jobs per organization.

The upload limit is an ASGI middleware so it can refuse on ``Content-Length`` before storing a byte
and stop a chunked upload the moment it crosses the limit (the rest of the body is read and discarded,
bounded in time, so the client receives a real 413); Litestar then spools what it accepted to
a temporary file, so memory stays flat whatever the upload's size. Rate limits are counted in the
database, so every API replica sees the same numbers, and counted under a per-organization lock, so
concurrent creates cannot all pass on the same count.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db.models import Job, Organization, RateEvent, now
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.settings import LimitSettings

ACTIVE = ("validating_files", "queued", "running", "paused")
#: How long an upload over the limit is read (and discarded) so that its client gets to see the 413.
DRAIN_SECONDS = 30.0


class UploadTooLarge(APIError):
    """Raised from inside the body stream; Litestar's error handling renders it as a 413 envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit} bytes", code="file_too_large",
                         param="file", headers={"Connection": "close"})


def upload_size_limit(limit: int, paths: tuple[str, ...] = ("/v1/files", "/v1/files/")) -> Any:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in paths:
                await app(scope, receive, send)
                return
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                if headers.get(b"expect", b"").lower() != b"100-continue":
                    await _drain(receive)  # a client waiting for 100 Continue never sends the body
                await _reject(send, limit)
                return
            seen = 0
            started = False

            async def counting_receive() -> Any:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        await _drain(receive)
                        raise UploadTooLarge(limit)
                return message

            async def tracking_send(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await app(scope, counting_receive, tracking_send)  # type: ignore[arg-type]
            except UploadTooLarge:
                if not started:
                    await _reject(send, limit)

        return guarded

    return middleware


async def _drain(receive: Receive, seconds: float = DRAIN_SECONDS) -> None:
    """Read and discard the rest of the body before answering 413.

    HTTP/1.1 clients send the whole body before they read the answer; a server that answers and
    closes mid-upload resets a connection with unread data, and the client sees a broken pipe instead
    of the 413. Discarding keeps memory flat; the time bound (as nginx's ``lingering_time``) keeps an
    endless upload from holding the connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=left)
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _reject(send: Any, limit: int) -> None:
    body = json.dumps({"error": {"message": f"upload is larger than the limit of {limit} bytes",
                                 "type": "invalid_request_error", "param": "file",
                                 "code": "file_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def lock_organization(session: Session, org: str) -> None:
    """Serialise one organization's creates until the transaction ends, on either database.

    A no-op UPDATE of the organization's row: PostgreSQL locks that row (a concurrent create waits
    here, then counts with a fresh snapshot that includes the job the first one inserted); SQLite
    takes its write lock at the first write, before anything is counted. Without it, 16 concurrent
    creates all count the same number and all pass a limit of 5."""
    session.execute(update(Organization).where(Organization.id == org).values(id=Organization.id))


def check_job_limits(repo: OrgRepository, limits: LimitSettings) -> None:
    """429 with Retry-After when an organization creates jobs too fast or has too many in flight.

    Call it in the transaction that inserts the job: the count and the insert are atomic per
    organization (:func:`lock_organization`)."""
    session, org = repo.session, repo.org
    lock_organization(session, org)
    active = session.scalar(select(func.count()).select_from(Job).where(Job.organization_id == org,
                                                                        Job.status.in_(ACTIVE))) or 0
    if active >= limits.max_active_jobs:
        raise APIError(429, f"your organization has {active} active jobs; the limit is {limits.max_active_jobs}. "
                       "Wait for one to finish or cancel one.", code="too_many_active_jobs",
                       headers={"Retry-After": "30"})
    window_start = now() - 60
    recent = list(session.scalars(select(Job.created_at).where(Job.organization_id == org,
                                                               Job.created_at > window_start)
                                  .order_by(Job.created_at)))
    if len(recent) >= limits.job_creates_per_minute:
        oldest_relevant = recent[len(recent) - limits.job_creates_per_minute]
        retry_after = max(1, math.ceil(oldest_relevant + 60 - now()))
        raise APIError(429, f"rate limit: {limits.job_creates_per_minute} job creations per minute",
                       code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


def check_request_rate(repo: OrgRepository, scope: str, per_minute: int) -> None:
    """429 with Retry-After past ``per_minute`` requests of ``scope`` in the last minute; records this one
    (counted under the organization's lock, like job creates)."""
    session, org = repo.session, repo.org
    lock_organization(session, org)
    window_start = now() - 60
    session.execute(delete(RateEvent).where(RateEvent.organization_id == org, RateEvent.scope == scope,
                                            RateEvent.created_at < now() - 3600))
    recent = list(session.scalars(select(RateEvent.created_at).where(
        RateEvent.organization_id == org, RateEvent.scope == scope, RateEvent.created_at > window_start)
        .order_by(RateEvent.created_at)))
    if len(recent) >= per_minute:
        oldest_relevant = recent[len(recent) - per_minute]
        retry_after = max(1, math.ceil(oldest_relevant + 60 - now()))
        raise APIError(429, f"rate limit: {per_minute} {scope} requests per minute", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry_after)})
    repo.add(RateEvent(organization_id=org, scope=scope))
