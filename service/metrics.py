"""Prometheus metrics: HTTP traffic, jobs by status, queue depth, job durations, and per-job series.

Each app gets its own registry (tests build many apps in one process). Route labels are the path
template, never the raw path, to keep cardinality low.

Per-job series come from the database, not from in-process gauges: the worker's ``Reporter`` writes
every step's metric points (plus peak host RSS and peak CUDA memory), and :class:`JobSeriesCollector`
reads, at scrape time, the latest point of each mapped name for every job whose status is
``running``. Nothing is shared between Celery's prefork children and the process that serves
``/metrics`` (no multiprocess directory to clean up), and a job's series vanish on the first scrape
after it ends. The API shows every running job (the embedded default; ``ALIGND_API_JOB_METRICS``);
each production worker serves its own jobs on ``ALIGND_WORKER_METRICS_PORT`` (``Job.worker``).

Recipe names (TRL's) → Prometheus (labels ``job_id``, ``method``):

- ``jobs.step`` → ``alignd_job_step``; ``loss`` → ``alignd_job_loss``
- DPO ``rewards/chosen|rejected|margins`` → ``alignd_job_reward{kind="chosen|rejected|margin"}``,
  ``rewards/accuracies`` → ``alignd_job_reward_accuracy``, and ``alignd_job_kl`` derived (below)
- DPO over-optimization signals (``workers.signals``): ``signals/displacement`` →
  ``alignd_job_likelihood_displacement``, ``logps/chosen_drift|rejected_drift`` →
  ``alignd_job_logps_drift{side="chosen|rejected"}``, ``signals/margin_growth`` → ``alignd_job_margin_growth``
- reward model ``margin`` → ``alignd_job_reward{kind="margin"}``,
  ``accuracy`` → ``alignd_job_reward_accuracy``
- PPO ``objective/kl`` → ``alignd_job_kl``, ``objective/scores`` → ``alignd_job_reward{kind="score"}``
- reinforcement ``reward`` → ``alignd_job_reward{kind="score"}``, ``eval/reward`` → ``{kind="eval"}``,
  ``kl`` → ``alignd_job_kl`` (per token, with ``kl_coef`` > 0), ``completions/clipped_ratio`` →
  ``alignd_job_completions_clipped_ratio``, ``frac_reward_zero_std`` → ``alignd_job_reward_zero_std_ratio``
- ``tokens_per_second`` → ``alignd_job_tokens_per_second``
- ``memory/host_peak_rss_bytes`` → ``alignd_job_host_memory_bytes``
- ``memory/gpu_peak_allocated_bytes/<device>`` → ``alignd_job_gpu_memory_bytes{device="<device>"}``

DPO's KL: DPO samples nothing from the policy, so there is no sampled KL. Its implicit rewards are
``beta * (log pi(y|x) - log pi_ref(y|x))`` for the dataset's chosen and rejected completions, so
``(rewards/chosen + rewards/rejected) / (2 beta)`` is the mean sequence-level policy/reference
log-ratio over both completions of the batch. It is 0 at step 1, moves away from 0 as the policy
leaves the reference, and (unlike a true KL) can be negative: DPO usually lowers the likelihood of
both completions. Alerts should therefore look at its absolute value.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from litestar import Request, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.db.engine import session_scope
from service.db.repositories import count_jobs_by_status
from service.db.telemetry import RunningJob, job_durations, jobs_by_queue, running_jobs
from service.queue import queue_depths
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
        for queue, value in (queue_depths(self.state.celery, self.state.settings) or {}).items():
            depth.add_metric([queue], value)
        yield depth
        yield self._queue_jobs()
        yield self._durations()

    def _queue_jobs(self) -> Metric:
        """Queued, running and paused jobs per queue: unlike the broker's depth, a running job still
        counts, so an autoscaler following it never removes the worker that runs it."""
        family = GaugeMetricFamily("alignd_queue_jobs", "Jobs routed to each queue, by status",
                                   labels=["queue", "status"])
        try:
            with session_scope(self.state.sessions) as session:
                counts = jobs_by_queue(session)
        except Exception:  # noqa: BLE001
            return family
        default = self.state.settings.placement.queues[0].name
        for queue in self.state.settings.placement.queues:
            for status in ("queued", "running", "paused"):
                n = counts.get((queue.name, status), 0)
                if queue.name == default:  # jobs created before placement existed have no queue
                    n += counts.get(("", status), 0)
                family.add_metric([queue.name, status], n)
        return family

    def _durations(self) -> Metric:
        family = HistogramMetricFamily("alignd_job_duration_seconds",
                                       "Time from a worker's start to the end state, by method and status",
                                       labels=["method", "status"])
        try:
            with session_scope(self.state.sessions) as session:
                rows = job_durations(session, DURATION_BUCKETS)
        except Exception:  # noqa: BLE001
            rows = []
        for row in rows:
            buckets = [(_bound(b), float(n)) for b, n in zip(DURATION_BUCKETS, row.cumulative, strict=True)]
            family.add_metric([row.method, row.status], buckets + [("+Inf", float(row.count))], row.total)
        return family


DURATION_BUCKETS = (30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0, 259200.0)


def _bound(value: float) -> str:
    return f"{value:.1f}"


#: recipe metric name → (Prometheus family, extra labels); per method where the meaning differs.
_COMMON_SERIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss": ("alignd_job_loss", ()),
    "tokens_per_second": ("alignd_job_tokens_per_second", ()),
    "memory/host_peak_rss_bytes": ("alignd_job_host_memory_bytes", ()),
}
_METHOD_SERIES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "dpo": {
        "rewards/chosen": ("alignd_job_reward", ("chosen",)),
        "rewards/rejected": ("alignd_job_reward", ("rejected",)),
        "rewards/margins": ("alignd_job_reward", ("margin",)),
        "rewards/accuracies": ("alignd_job_reward_accuracy", ()),
        # over-optimization signals (workers.signals, docs/overoptimization.md)
        "signals/displacement": ("alignd_job_likelihood_displacement", ()),
        "logps/chosen_drift": ("alignd_job_logps_drift", ("chosen",)),
        "logps/rejected_drift": ("alignd_job_logps_drift", ("rejected",)),
        "signals/margin_growth": ("alignd_job_margin_growth", ()),
    },
    "reward_model": {
        "margin": ("alignd_job_reward", ("margin",)),
        "accuracy": ("alignd_job_reward_accuracy", ()),
    },
    "ppo": {
        "objective/kl": ("alignd_job_kl", ()),
        "objective/scores": ("alignd_job_reward", ("score",)),
    },
    "reinforcement": {  # TRL's GRPO names
        "reward": ("alignd_job_reward", ("score",)),
        "kl": ("alignd_job_kl", ()),
        "completions/clipped_ratio": ("alignd_job_completions_clipped_ratio", ()),
        "frac_reward_zero_std": ("alignd_job_reward_zero_std_ratio", ()),
        "eval/reward": ("alignd_job_reward", ("eval",)),
    },
    "generate_preferences": {  # the judge's scores of the pairs kept so far
        "score/chosen_mean": ("alignd_job_reward", ("chosen",)),
        "score/rejected_mean": ("alignd_job_reward", ("rejected",)),
        "score/mean_gap": ("alignd_job_reward", ("margin",)),
    },
}
GPU_MEMORY_PREFIX = "memory/gpu_peak_allocated_bytes/"

#: family → (help, extra label names): every family is exposed, with or without samples, so the
#: dashboard's names can be checked against any scrape.
JOB_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "alignd_job_step": ("Optimizer steps done", ()),
    "alignd_job_loss": ("Training loss at the latest step", ()),
    "alignd_job_kl": ("KL to the reference (PPO: sampled; DPO: mean policy/reference log-ratio)", ()),
    "alignd_job_reward": ("Reward at the latest step (chosen/rejected/margin: DPO, RM; score: PPO and "
                          "reinforcement; eval: reinforcement's latest evaluation)", ("kind",)),
    "alignd_job_completions_clipped_ratio": ("Share of the latest step's completions cut at max_new_tokens "
                                             "(reinforcement)", ()),
    "alignd_job_reward_zero_std_ratio": ("Share of the latest step's groups whose samples all got the same "
                                         "reward: no learning signal (reinforcement)", ()),
    "alignd_job_reward_accuracy": ("Share of pairs whose chosen reward beats the rejected one", ()),
    "alignd_job_likelihood_displacement": ("Share of the latest step's pairs whose chosen completion became "
                                           "less likely than under the reference (DPO)", ()),
    "alignd_job_logps_drift": ("Mean per-token log-prob change, policy minus reference, of the chosen or "
                               "rejected completions at the latest step (DPO)", ("side",)),
    "alignd_job_margin_growth": ("Least-squares slope per step of the reward margin over the last 5 steps "
                                 "(DPO)", ()),
    "alignd_job_tokens_per_second": ("Tokens processed per second in the latest step", ()),
    "alignd_job_gpu_memory_bytes": ("Peak CUDA memory allocated by the job, per device", ("device",)),
    "alignd_job_host_memory_bytes": ("Peak resident memory (RSS) of the job's processes", ()),
}


def job_samples(job: RunningJob) -> list[tuple[str, tuple[str, ...], float]]:
    """(family, extra label values, value) for one running job's latest points."""
    samples: list[tuple[str, tuple[str, ...], float]] = [("alignd_job_step", (), float(job.step))]
    mapping = {**_COMMON_SERIES, **_METHOD_SERIES.get(job.method_type, {})}
    for name, value in job.latest.items():
        if name in mapping:
            family, extra = mapping[name]
            samples.append((family, extra, value))
        elif name.startswith(GPU_MEMORY_PREFIX):
            samples.append(("alignd_job_gpu_memory_bytes", (name.removeprefix(GPU_MEMORY_PREFIX),), value))
    beta = job.hyperparameter("beta")
    if job.method_type == "dpo" and beta and {"rewards/chosen", "rewards/rejected"} <= job.latest.keys():
        mean_log_ratio = (job.latest["rewards/chosen"] + job.latest["rewards/rejected"]) / (2 * float(beta))
        samples.append(("alignd_job_kl", (), mean_log_ratio))
    return samples


class JobSeriesCollector(Collector):
    """Per-job gauges for every running job (only ``worker``'s jobs when given), read at scrape time."""

    def __init__(self, state: AppState, worker: str | None = None) -> None:
        self.state = state
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(name, text, labels=["job_id", "method", *extra])
                     for name, (text, extra) in JOB_FAMILIES.items()}
        try:
            with session_scope(self.state.sessions) as session:
                jobs = running_jobs(session, worker=self.worker)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB blinked
            jobs = []
        for job in jobs:
            for family, extra, value in job_samples(job):
                families[family].add_metric([job.id, job.method_type, *extra], value)
        yield from families.values()


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
    if state.settings.metrics.api_job_series:
        registry.register(JobSeriesCollector(state))
    return registry, HttpMetrics(registry)


def worker_registry(state: AppState, worker: str) -> CollectorRegistry:
    """What a worker's own ``/metrics`` port serves: the series of the jobs it runs."""
    registry = CollectorRegistry()
    registry.register(JobSeriesCollector(state, worker=worker))
    return registry


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics_endpoint(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
    registry: Any = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
