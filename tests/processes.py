"""Real processes for end-to-end tests: a Celery worker and the embedded ``alignd serve``."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.cli import worker_command
from service.settings import Settings
from tests.zygote import WarmProcess, zygote_for

TERMINAL = {"succeeded", "failed", "cancelled"}
#: a process the tests stop: a child, or a worker forked by this test process's zygote
Process = subprocess.Popen[bytes] | WarmProcess


def production_env(tmp_path: Path, postgres_url: str, s3_endpoint: str) -> dict[str, str]:
    """Production parts for worker processes: PostgreSQL, Redis (a queue of the test's own), S3 on moto."""
    from tests.conftest import MODEL_CACHE, REDIS_URL

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")},
        "ALIGND_DATA_DIR": str(tmp_path / "data"),
        "ALIGND_DATABASE_URL": postgres_url,
        "ALIGND_BROKER_URL": REDIS_URL,
        "ALIGND_QUEUE": "alignd-test-" + secrets.token_hex(4),
        "ALIGND_STORAGE_URL": f"s3://alignd-e2e/{secrets.token_hex(4)}",
        "ALIGND_S3_ENDPOINT_URL": s3_endpoint,
        "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def celery_worker(settings: Settings, env: dict[str, str], log: Path) -> Iterator[WarmProcess]:
    """``alignd worker``'s exact command line, in its own session with its own environment, forked warm
    from this test process's zygote for that environment (``tests/zygote.py``: the training stack
    already imported)."""
    proc = zygote_for(env).fork(worker_command(settings), env, log)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: Process, timeout: float = 8) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_job(get: Any, job_id: str, timeout: float = 600, until: set[str] = TERMINAL) -> dict[str, Any]:
    deadline = time.time() + timeout
    job: dict[str, Any] = {}
    while time.time() < deadline:
        job = get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.2)  # a GET is a few ms; under ``-n 2`` a longer nap leaves this core idle
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout}s")


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up in {timeout}s")


def alignd(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([str(Path(sys.executable).parent / "alignd"), *args], env=env, check=True,
                          capture_output=True, text=True, timeout=120).stdout
