"""Service-wide Prometheus metrics: HTTP traffic, jobs by status, queue depth.

Each app gets its own registry (tests build many apps in one process). Route labels are the path
template, never the raw path, to keep cardinality low.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from litestar import Request, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.db.engine import session_scope
from service.db.repositories import count_jobs_by_status
from service.queue import queue_depth
from service.state import AppState

STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")


class ServiceCollector(Collector):
    """Reads the database and the broker at scrape time, so the numbers are never stale."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("alignd_jobs", "Jobs by status", labels=["status"])
        try:
            with session_scope(self.state.sessions) as session:
                counts = count_jobs_by_status(session)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB blinked
            counts = {}
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        depth = GaugeMetricFamily("alignd_queue_depth", "Messages waiting per queue", labels=["queue"])
        value = queue_depth(self.state.celery, self.state.settings)
        if value is not None:
            depth.add_metric([self.state.settings.broker.queue], value)
        yield depth


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("alignd_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=registry)
        self.latency = Histogram("alignd_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status = {"code": 500}

            async def capture(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await app(scope, receive, capture)
            finally:
                route = str(scope.get("path_template") or "unmatched")  # type: ignore[typeddict-item]
                method = str(scope.get("method", "GET"))
                self.requests.labels(method, route, str(status["code"])).inc()
                self.latency.labels(method, route).observe(time.perf_counter() - start)

        return wrapped


def make_registry(state: AppState) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    registry.register(ServiceCollector(state))
    return registry, HttpMetrics(registry)


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics_endpoint(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
    registry: Any = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
