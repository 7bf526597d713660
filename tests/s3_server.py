"""Pytest plugin: a real S3 endpoint (moto's server) for tests of the S3 code paths.

moto runs as a separate process rather than ``mock_aws`` in-process so that boto3 exercises its
real HTTP stack (multipart uploads, retries, streaming bodies) and so that subprocesses started
by tests (workers, the CLI) can reach the same endpoint through ``ALIGND_S3_ENDPOINT_URL``.

List it in ``pytest_plugins``; it provides ``s3_endpoint`` (session) and ``s3_settings``
(a fresh prefix per test, so tests never see each other's objects).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import StorageSettings

TEST_BUCKET = "alignd-test"
_STARTUP_TIMEOUT_S = 30.0

# Fake credentials: moto accepts anything, and fixed values keep a developer's real AWS
# credentials (or profile) from ever being used against a real account by a test.
_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _moto_server_executable() -> str:
    """The ``moto_server`` script installed beside the running interpreter (the venv's bin)."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("moto_server")
    if found is None:
        pytest.fail("moto_server not found; install the dev extras (moto[server])")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start ``moto_server`` on a free port for the session and yield its URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The log goes to a file, not a pipe: an undrained pipe would block moto once it fills up.
    log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [_moto_server_executable(), "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not _answers(f"{endpoint}/moto-api/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                tail = Path(log.name).read_text(errors="replace")[-4000:]
                pytest.fail(f"moto_server did not start on {endpoint} (exit {proc.poll()}):\n{tail}")
            time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in _TEST_ENV.items():
                mp.setenv(name, value)
            for name in _UNSET_ENV:
                mp.delenv(name, raising=False)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture
def s3_settings(s3_endpoint: str) -> StorageSettings:
    """Storage settings for a fresh, empty prefix in the test bucket on moto's server."""
    return StorageSettings(url=f"s3://{TEST_BUCKET}/{uuid.uuid4().hex}", s3_endpoint_url=s3_endpoint)
