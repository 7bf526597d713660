"""Shared fixtures: real SQLite and PostgreSQL databases, real storage, API clients with keys.

PostgreSQL tests each get their own schema in the ``test`` database (created and dropped here), so
runs never see each other's rows. Models are materialised once into a cache shared by all tests.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import create_engine, text

from service.app import create_app
from service.auth import create_key
from service.db.engine import session_scope
from service.graders.sandbox import THREAD_POOL_VARS
from service.model_registry import BUILTIN_MODELS
from service.settings import DatabaseSettings, Settings
from service.state import AppState
from tests.paths import MODEL_CACHE, REPO  # noqa: F401 - REPO: re-exported for the tests that import it here

pytest_plugins = ["tests.s3_server"]

POSTGRES_URL = os.environ.get("ALIGND_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ALIGND_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (``make test`` runs ``-n 2``) each test process, and every worker or rank process it
# starts (they inherit this environment), gets its share of the cores for torch's and BLAS's thread pools.
# Two processes each running two OpenMP threads on two cores oversubscribe them: the spinning threads burn
# the other process's time and every small matmul waits for a descheduled thread.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    for _var in THREAD_POOL_VARS:
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))

# The files that take longest, heaviest first: xdist hands out whole files (``--dist loadfile``) in
# collection order (``--no-loadscope-reorder``), and longest-first lets the two processes end together
# (the rest, a few seconds each, fill the gaps). Seconds each under ``make test`` on the 2-core machine
# (2026-12-03): 303, 134, 121, 116, 92, 86, 82, 72, 57, then 42 down to 17.
HEAVY_FIRST = [
    "test_recipe_ppo.py", "test_resume.py", "test_multinode_local.py", "test_reinforcement.py", "test_shutdown.py",
    "test_memory_estimate.py", "test_retention.py", "test_fuzz.py", "test_demo.py", "test_multi_gpu.py",
    "test_prometheus.py", "test_fsdp.py", "test_graders_api.py", "test_e2e_dpo.py", "test_fencing.py",
    "test_logprobs.py", "test_cli_client.py", "test_dashboard.py", "test_worker_processes.py",
    "test_base_models.py", "test_dpo_recipe.py", "test_limits_concurrency.py", "test_gpu_bench.py",
    "test_job_metrics.py", "test_grader_sandbox.py",
]


_MATERIALISING: subprocess.Popen[bytes] | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the built-in base models in the background before the test processes need them.

    On a fresh clone SmolLM2's conversion (~20 s of one core) otherwise happens inside the first test
    that asks for it, while the other test process's SmolLM2 test waits on the conversion lock with its
    core idle. Started here, in the xdist controller (or the only process) before any test runs, it
    overlaps with the first tests instead; the tests that need a model wait on the same lock
    (``workers.base_models.materialise``) until it is done."""
    global _MATERIALISING
    if os.environ.get("PYTEST_XDIST_WORKER") or all((MODEL_CACHE / name).is_dir() for name in BUILTIN_MODELS):
        return
    script = ("import sys; from service.settings import Settings; from workers.base_models import resolve_base_model; "
              "[resolve_base_model(name, Settings.from_env()) for name in sys.argv[1:]]")
    # Quiet (its progress bars would interleave with pytest's): if it fails, the first test that needs the
    # model runs the same conversion itself and reports the error.
    _MATERIALISING = subprocess.Popen([sys.executable, "-c", script, *BUILTIN_MODELS], cwd=REPO,
                                      env={**os.environ, "ALIGND_MODEL_CACHE": str(MODEL_CACHE)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _MATERIALISING is not None:
        _MATERIALISING.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def make_settings(data_dir: Path, database_url: str | None = None) -> Settings:
    settings = Settings.from_env(data_dir)
    settings = replace(settings, model_cache_dir=MODEL_CACHE)
    if database_url:
        settings = replace(settings, database=DatabaseSettings(database_url))
    return settings


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the real PostgreSQL ``test`` database, dropped afterwards."""
    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(DatabaseSettings(POSTGRES_URL).sqlalchemy_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "postgresql":
        return make_settings(tmp_path, request.getfixturevalue("postgres_url"))
    return make_settings(tmp_path)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    state: AppState

    def key(self, org: str) -> dict[str, str]:
        with session_scope(self.state.sessions) as session:
            _, secret = create_key(session, org)
        return {"Authorization": f"Bearer {secret}"}


def _api(settings: Settings) -> Iterator[Api]:
    app = create_app(settings)
    with TestClient(app=app, raise_server_exceptions=False) as client:
        yield Api(client, app.state.alignd)
    app.state.alignd.engine.dispose()


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    """The API on SQLite and on PostgreSQL (parametrised through ``settings``)."""
    yield from _api(settings)


@pytest.fixture
def sqlite_api(sqlite_settings: Settings) -> Iterator[Api]:
    yield from _api(sqlite_settings)


def jsonl(rows: list[dict[str, object]]) -> bytes:
    import json

    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


PREFERENCE_ROWS = [
    {"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
     "rejected": f"Well, let me think about this carefully. Adding {a} and {b} together gives {a + b}."}
    for a in range(1, 9) for b in (2, 5)
]


@pytest.fixture
def upload(api: Api) -> Callable[..., dict[str, object]]:
    def _upload(headers: dict[str, str], rows: list[dict[str, object]] | bytes = PREFERENCE_ROWS,
                name: str = "train.jsonl") -> dict[str, object]:
        content = rows if isinstance(rows, bytes) else jsonl(rows)
        response = api.client.post("/v1/files", headers=headers, files={"file": (name, content)},
                                   data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    return _upload


@dataclass
class LiveService:
    """The API in-process plus one real Celery worker process, shared by a test module."""

    api: Api
    headers: dict[str, str]
    log: Path
    org: str = "acme"

    def get(self, path: str) -> Any:
        return self.api.client.get(path, headers=self.headers)

    def upload(self, rows: list[dict[str, object]] | bytes, name: str = "data.jsonl") -> dict[str, Any]:
        content = rows if isinstance(rows, bytes) else jsonl(rows)
        r = self.api.client.post("/v1/files", headers=self.headers, files={"file": (name, content)},
                                 data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.api.client.post("/v1/fine_tuning/jobs", headers=self.headers, json=body)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def run(self, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """Create a job and wait for its end state; the worker log is printed if it did not succeed."""
        from tests.processes import wait_for_job

        job = wait_for_job(self.get, self.create_job(body)["id"], timeout=timeout)
        if job["status"] != "succeeded":
            print(self.log.read_text()[-6000:])
        return job

    def metric(self, job_id: str, name: str) -> list[float]:
        data = self.get(f"/v1/fine_tuning/jobs/{job_id}/metrics?name={name}").json()["data"]
        return [p["value"] for p in data]


@pytest.fixture(scope="session")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Path]]:
    """Embedded parts (SQLite, filesystem broker, local objects) with one real worker process, started
    once per test session: starting a worker (torch, transformers) costs more than most tests."""
    from tests.processes import celery_worker

    root = tmp_path_factory.mktemp("live")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(root / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE)}
    settings = make_settings(root / "data")
    gen = _api(settings)
    api = next(gen)
    try:
        with celery_worker(settings, env, root / "worker.log"):
            yield api, root / "worker.log"
    finally:
        next(gen, None)


@pytest.fixture(scope="module")
def live(live_service: tuple[Api, Path], request: pytest.FixtureRequest) -> Iterator[LiveService]:
    """The shared live service, seen by this module as its own organization (so listings, limits and
    idempotency keys are the module's alone). Jobs the module leaves unfinished are cancelled at its end,
    so the next module finds the worker idle."""
    from tests.processes import TERMINAL, wait_for_job

    api, log = live_service
    org = "mod-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")
    service = LiveService(api, api.key(org), log, org)
    yield service
    listed = service.get("/v1/fine_tuning/jobs?limit=100").json()["data"]
    for job in listed:
        if job["status"] not in TERMINAL:
            api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=service.headers)
    for job in listed:
        if job["status"] not in TERMINAL:
            wait_for_job(service.get, job["id"], timeout=120, until=TERMINAL | {"paused"})


@pytest.fixture
def production(tmp_path: Path, postgres_url: str, s3_endpoint: str,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], Settings, Api]]:
    """Production parts (PostgreSQL, Redis, S3 on moto) for the in-process API and for worker processes:
    (the workers' environment, the API's settings, the API). Heartbeats every 0.5 s."""
    from tests.processes import production_env

    env = production_env(tmp_path, postgres_url, s3_endpoint) | {"ALIGND_HEARTBEAT_INTERVAL": "0.5"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    gen = _api(settings)
    api = next(gen)
    yield env, settings, api
    next(gen, None)
