"""Settings read from ``ALIGND_*`` environment variables, one dataclass per concern.

Everything defaults to the embedded mode (SQLite, filesystem broker, local object store under the
data dir) so ``alignd serve`` works with no configuration; naming a production part in the
environment switches to it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class DatabaseSettings:
    url: str

    @property
    def sqlalchemy_url(self) -> str:
        """psycopg 3 is the PostgreSQL driver; users write plain ``postgresql://`` URLs."""
        for prefix in ("postgresql://", "postgres://"):
            if self.url.startswith(prefix):
                return "postgresql+psycopg://" + self.url[len(prefix):]
        return self.url

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    filesystem_dir: Path
    queue: str = "alignd"

    @property
    def embedded(self) -> bool:
        return self.url.startswith("filesystem://")


@dataclass(frozen=True)
class StorageSettings:
    url: str
    s3_endpoint_url: str | None = None


@dataclass(frozen=True)
class LimitSettings:
    max_upload_bytes: int = 1 << 30
    max_json_bytes: int = 1 << 20
    max_line_bytes: int = 4 << 20
    max_json_depth: int = 32
    job_creates_per_minute: int = 60
    max_active_jobs: int = 32


@dataclass(frozen=True)
class QueueSpec:
    """A Celery queue and what each worker consuming it can hold.

    ``capacity_bytes`` is the memory of one device (GPU memory, or host memory for a CPU queue);
    ``devices`` how many devices one worker has (the most ``resources.gpus`` a job there may ask
    for). ``None`` means unlimited (the embedded default's single queue).

    ``multinode``: this queue's workers can launch a job on several nodes (``resources.nodes`` > 1):
    on Kubernetes they submit it as a JobSet (``workers/jobset_supervisor.py``), locally a launcher
    starts the node groups on this machine. ``devices`` is then the GPUs of one node (the most
    ``resources.gpus_per_node``) and ``max_nodes`` the most nodes a job may ask for (None: as many
    as the cluster's quota admits; Kueue holds the rest in its queue).
    """

    name: str
    capacity_bytes: int | None = None
    devices: int | None = None
    multinode: bool = False
    max_nodes: int | None = None


@dataclass(frozen=True)
class PlacementSettings:
    """Where jobs go: ``ALIGND_QUEUES`` (``name=capacity[:devices]``, comma-separated), the queue this
    worker consumes (``ALIGND_WORKER_QUEUE``), and the throughput assumed for time estimates when no
    finished job of the model has been measured (``ALIGND_TOKENS_PER_SECOND``)."""

    queues: tuple[QueueSpec, ...] = (QueueSpec("alignd", multinode=True),)
    #: Celery ``-Q`` of ``alignd worker``: comma-separated; every configured queue when not set
    #: (the embedded default). Production sets it per GPU class.
    worker_queue: str = "alignd"
    tokens_per_second: float = 1000.0


@dataclass(frozen=True)
class MetricsSettings:
    """``ALIGND_WORKER_METRICS_PORT``: each worker serves its own jobs' series on this port.
    ``ALIGND_API_JOB_METRICS``: whether the API's ``/metrics`` also shows every running job's series
    (on by default, which the embedded default needs; production turns it off when workers serve them)."""

    worker_port: int | None = None
    api_job_series: bool = True


@dataclass(frozen=True)
class GraderSettings:
    """``graders/run`` and the python-grader sandbox (see service/graders/).

    ``ALIGND_GRADER_QUEUE``: the Celery queue model graders are sent to (default: the first configured
    queue). ``ALIGND_GRADER_PICKUP_TIMEOUT``: seconds the API waits for a worker to start a model
    grader before answering 503 with Retry-After; ``ALIGND_GRADER_RUN_TIMEOUT``: seconds it then waits
    for the result. ``ALIGND_GRADER_REQUESTS_PER_MINUTE``: validate + run calls per organization.
    ``ALIGND_GRADER_SAMPLE_TIMEOUT``, ``ALIGND_GRADER_CPU_SECONDS``, ``ALIGND_GRADER_MEMORY_BYTES``,
    ``ALIGND_GRADER_MAX_PROCESSES``, ``ALIGND_GRADER_TMP_BYTES``: the sandbox's limits per call;
    ``ALIGND_GRADER_SANDBOX_UID_BASE``: the first uid of the range sandboxes run as (65536 uids).
    ``ALIGND_GRADER_CGROUP``: ``auto`` (a memory + pids cgroup per call where one can be made), ``off``,
    or a delegated cgroup v2 directory.
    """

    queue: str | None = None
    pickup_timeout: float = 10.0
    run_timeout: float = 120.0
    requests_per_minute: int = 120
    sample_timeout: float = 120.0
    cpu_seconds: int = 120
    memory_bytes: int = 2 << 30
    max_processes: int = 32
    tmp_bytes: int = 256 << 20
    sandbox_uid_base: int = 10_000_000
    cgroup: str = "auto"


@dataclass(frozen=True)
class WorkerSettings:
    """``ALIGND_WORKER_SHUTDOWN_GRACE``: seconds within which a worker told to stop (SIGTERM) has
    checkpointed its job, handed it back to the queue and exited (``workers/shutdown.py``). The k8s
    worker Deployments' ``terminationGracePeriodSeconds`` equals it; ``alignd serve`` waits as long."""

    shutdown_grace: float = 300.0


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database: DatabaseSettings
    broker: BrokerSettings
    storage: StorageSettings
    models: dict[str, str] = field(default_factory=dict)
    model_cache_dir: Path = Path(".alignd/models")
    limits: LimitSettings = field(default_factory=LimitSettings)
    placement: PlacementSettings = field(default_factory=PlacementSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    graders: GraderSettings = field(default_factory=GraderSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> Settings:
        root = Path(data_dir or _env("ALIGND_DATA_DIR", "./.alignd") or ".alignd").resolve()
        broker_dir = root / "broker"
        default_queue = _env("ALIGND_QUEUE", "alignd") or "alignd"
        # The embedded default's one queue takes everything: its worker runs node groups on this machine.
        queues = parse_queues(_env("ALIGND_QUEUES", "") or "") or (QueueSpec(default_queue, multinode=True),)
        port = _env("ALIGND_WORKER_METRICS_PORT")
        return cls(
            data_dir=root,
            database=DatabaseSettings(_env("ALIGND_DATABASE_URL") or f"sqlite:///{root / 'alignd.db'}"),
            broker=BrokerSettings(
                url=_env("ALIGND_BROKER_URL") or "filesystem://",
                filesystem_dir=broker_dir,
                queue=_env("ALIGND_QUEUE", "alignd") or "alignd",
            ),
            storage=StorageSettings(
                url=_env("ALIGND_STORAGE_URL") or f"file://{root / 'objects'}",
                s3_endpoint_url=_env("ALIGND_S3_ENDPOINT_URL"),
            ),
            models=parse_models(_env("ALIGND_MODELS", "") or ""),
            model_cache_dir=Path(_env("ALIGND_MODEL_CACHE") or root / "models").resolve(),
            limits=LimitSettings(
                max_upload_bytes=_int("ALIGND_MAX_UPLOAD_BYTES", 1 << 30),
                max_json_bytes=_int("ALIGND_MAX_JSON_BYTES", 1 << 20),
                job_creates_per_minute=_int("ALIGND_JOB_CREATES_PER_MINUTE", 60),
                max_active_jobs=_int("ALIGND_MAX_ACTIVE_JOBS", 32),
            ),
            placement=PlacementSettings(
                queues=queues,
                worker_queue=_env("ALIGND_WORKER_QUEUE") or ",".join(q.name for q in queues),
                tokens_per_second=float(_env("ALIGND_TOKENS_PER_SECOND", "1000") or 1000),
            ),
            graders=GraderSettings(
                queue=_env("ALIGND_GRADER_QUEUE"),
                pickup_timeout=_float("ALIGND_GRADER_PICKUP_TIMEOUT", 10.0),
                run_timeout=_float("ALIGND_GRADER_RUN_TIMEOUT", 120.0),
                requests_per_minute=_int("ALIGND_GRADER_REQUESTS_PER_MINUTE", 120),
                sample_timeout=_float("ALIGND_GRADER_SAMPLE_TIMEOUT", 120.0),
                cpu_seconds=_int("ALIGND_GRADER_CPU_SECONDS", 120),
                memory_bytes=_int("ALIGND_GRADER_MEMORY_BYTES", 2 << 30),
                max_processes=_int("ALIGND_GRADER_MAX_PROCESSES", 32),
                tmp_bytes=_int("ALIGND_GRADER_TMP_BYTES", 256 << 20),
                sandbox_uid_base=_int("ALIGND_GRADER_SANDBOX_UID_BASE", 10_000_000),
                cgroup=_env("ALIGND_GRADER_CGROUP", "auto") or "auto",
            ),
            metrics=MetricsSettings(
                worker_port=int(port) if port else None,
                api_job_series=(_env("ALIGND_API_JOB_METRICS", "true") or "true").lower()
                not in ("0", "false", "no", "off"),
            ),
            worker=WorkerSettings(shutdown_grace=float(_env("ALIGND_WORKER_SHUTDOWN_GRACE", "300") or 300)),
        )


def parse_models(spec: str) -> dict[str, str]:
    """``ALIGND_MODELS`` is ``name=path_or_s3_url`` pairs separated by commas."""
    models: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, location = item.partition("=")
        if not sep or not name.strip() or not location.strip():
            raise ValueError(f"ALIGND_MODELS entry {item!r} is not name=location")
        models[name.strip()] = location.strip()
    return models


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
          "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str) -> int | None:
    """``24GiB``, ``80GB``, ``24Gi``, ``512MiB``, ``1e9`` → bytes; ``unlimited``/``inf``/``*`` → None."""
    value = text.strip().lower()
    if value in ("unlimited", "inf", "*", "none"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 24GiB, 80GB or unlimited")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_queues(spec: str) -> tuple[QueueSpec, ...]:
    """``ALIGND_QUEUES``: ``gpu-24g=24GiB,gpu-80g=80GiB:8,cpu=64GiB`` (``:N`` devices per worker, default 1;
    ``:*`` unlimited), and ``:multinode`` (or ``:multinode=M``, at most M nodes a job) for a queue whose
    workers launch jobs across nodes: ``gpu-80g-multinode=80GiB:8:multinode=16``."""
    queues: list[QueueSpec] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"ALIGND_QUEUES entry {item!r} is not name=capacity[:devices][:multinode[=M]]")
        capacity, *options = (part.strip() for part in rest.split(":"))
        devices: int | None = 1
        multinode, max_nodes = False, None
        for position, option in enumerate(options):
            flag, _, value = option.partition("=")
            if flag == "multinode":
                multinode = True
                if value and (not value.isdigit() or int(value) < 1):
                    raise ValueError(f"ALIGND_QUEUES entry {item!r}: multinode={value} is not a node count >= 1")
                max_nodes = int(value) if value else None
            elif position == 0:
                devices = None if option == "*" else int(option or 1)
            else:
                raise ValueError(f"ALIGND_QUEUES entry {item!r}: unknown option {option!r} "
                                 "(expected name=capacity[:devices][:multinode[=M]])")
        queues.append(QueueSpec(name, parse_bytes(capacity), devices, multinode, max_nodes))
    if len({q.name for q in queues}) != len(queues):
        raise ValueError("ALIGND_QUEUES names a queue twice")
    return tuple(queues)
