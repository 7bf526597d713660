"""Limits hold under concurrent requests: 16 creates at once against a real ``alignd api`` process, on
SQLite and on PostgreSQL — the job-creation rate limit, the active-job limit and Idempotency-Key each
let exactly as many through as they allow."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, jsonl
from tests.processes import alignd, free_port, stop, wait_http

CONCURRENT = 16


class Server:
    def __init__(self, base: str, env: dict[str, str]) -> None:
        self.base = base
        self.env = env

    def key(self, org: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {alignd('keys', 'create', '--org', org, env=self.env).strip()}"}

    def upload(self, headers: dict[str, str]) -> str:
        r = httpx.post(f"{self.base}/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                       data={"purpose": "fine-tune"}, timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def create_at_once(self, headers: dict[str, str], body: dict[str, Any],
                       key: str | None = None) -> list[httpx.Response]:
        """CONCURRENT creates released together by a barrier, each on its own connection."""
        barrier = threading.Barrier(CONCURRENT)
        extra = {"Idempotency-Key": key} if key else {}

        def one(_: int) -> httpx.Response:
            with httpx.Client(base_url=self.base, timeout=120) as client:
                barrier.wait()
                return client.post("/v1/fine_tuning/jobs", headers=headers | extra, json=body)

        with ThreadPoolExecutor(CONCURRENT) as pool:
            return list(pool.map(one, range(CONCURRENT)))

    def jobs(self, headers: dict[str, str]) -> list[dict[str, Any]]:
        return httpx.get(f"{self.base}/v1/fine_tuning/jobs?limit=100", headers=headers,  # type: ignore[no-any-return]
                         timeout=30).json()["data"]


@pytest.fixture(params=["sqlite", "postgresql"])
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    database = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    procs: list[subprocess.Popen[bytes]] = []

    def start(**limits: int) -> Server:
        root = tmp_path / f"server{len(procs)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
        env |= {"ALIGND_DATA_DIR": str(root), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
                **{f"ALIGND_{name.upper()}": str(value) for name, value in limits.items()}}
        if database:
            env["ALIGND_DATABASE_URL"] = database
        port = free_port()
        log = (tmp_path / f"api{len(procs)}.log").open("wb")
        proc = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "api", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return Server(f"http://127.0.0.1:{port}", env)

    yield start
    for proc in procs:
        stop(proc)


def _body(file_id: str) -> dict[str, Any]:
    return {"model": "tiny-random-llama", "training_file": file_id, "method": {"type": "dpo"}}


def test_rate_limit_under_concurrent_creates(server_factory: Any) -> None:
    server = server_factory(job_creates_per_minute=5, max_active_jobs=1000)
    headers = server.key("acme")
    responses = server.create_at_once(headers, _body(server.upload(headers)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [429] * (CONCURRENT - 5), [r.text for r in responses if r.status_code >= 500]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"rate_limit_exceeded"}
    assert len(server.jobs(headers)) == 5


def test_active_job_limit_under_concurrent_creates(server_factory: Any) -> None:
    server = server_factory(job_creates_per_minute=1000, max_active_jobs=3)
    headers = server.key("acme")
    responses = server.create_at_once(headers, _body(server.upload(headers)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [429] * (CONCURRENT - 3), [r.text for r in responses if r.status_code >= 500]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"too_many_active_jobs"}
    assert len(server.jobs(headers)) == 3


def test_idempotency_key_under_concurrent_creates(server_factory: Any) -> None:
    server = server_factory(job_creates_per_minute=1000, max_active_jobs=1000)
    headers = server.key("acme")
    responses = server.create_at_once(headers, _body(server.upload(headers)), key="retry-me")
    assert [r.status_code for r in responses] == [200] * CONCURRENT, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(server.jobs(headers)) == 1
