"""Limits: uploads refused while streaming (server RSS measured), JSON body limit, rate and active-job limits."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest

from service.settings import LimitSettings
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, _api, jsonl, make_settings
from tests.processes import alignd, free_port, stop, wait_http

MB = 1 << 20


@pytest.fixture
def small_limits_api(tmp_path: Path) -> Iterator[Api]:
    settings = make_settings(tmp_path)
    settings = replace(settings, limits=LimitSettings(max_upload_bytes=2 * MB, job_creates_per_minute=3,
                                                      max_active_jobs=100))
    yield from _api(settings)


def test_upload_over_the_limit_is_413(small_limits_api: Api) -> None:
    api = small_limits_api
    body = jsonl(PREFERENCE_ROWS) * (3 * MB // len(jsonl(PREFERENCE_ROWS)) + 1)
    r = api.client.post("/v1/files", headers=api.key("acme"), files={"file": ("big.jsonl", body)},
                        data={"purpose": "fine-tune"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_json_body_over_the_limit_is_413(small_limits_api: Api) -> None:
    api = small_limits_api
    r = api.client.post("/v1/fine_tuning/jobs", headers=api.key("acme"),
                        json={"model": "x" * (2 * MB), "training_file": "f", "method": {"type": "dpo"}})
    assert r.status_code == 413
    assert "error" in r.json()


def test_job_creation_rate_limit_gives_429_with_retry_after(small_limits_api: Api) -> None:
    api = small_limits_api
    headers = api.key("acme")
    f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    body = {"model": "tiny-random-llama", "training_file": f["id"], "method": {"type": "dpo"}}
    codes = [api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 60
    # another organization has its own budget
    other = api.key("globex")
    g = api.client.post("/v1/files", headers=other, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    assert api.client.post("/v1/fine_tuning/jobs", headers=other,
                           json={**body, "training_file": g["id"]}).status_code == 200


def test_active_jobs_limit(tmp_path: Path) -> None:
    settings = replace(make_settings(tmp_path), limits=LimitSettings(max_active_jobs=2))
    gen = _api(settings)
    api = next(gen)
    headers = api.key("acme")
    f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    body = {"model": "tiny-random-llama", "training_file": f["id"], "method": {"type": "dpo"}}
    ids = [api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()["id"] for _ in range(2)]
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs"
    api.client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=headers)
    assert api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body).status_code == 200
    next(gen, None)


def test_streamed_oversized_upload_does_not_grow_server_memory(tmp_path: Path) -> None:
    """A real server process: 300 MB streamed (chunked, no Content-Length) against a 64 MB limit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
            "ALIGND_MAX_UPLOAD_BYTES": str(64 * MB)}
    key = alignd("keys", "create", "--org", "acme", env=env).strip()
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "api", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        server = psutil.Process(proc.pid)
        before = server.memory_info().rss
        boundary = "alignd-boundary"
        line = jsonl(PREFERENCE_ROWS[:1])

        def body() -> Iterator[bytes]:
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                   f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.jsonl\"\r\n"
                   "Content-Type: application/jsonl\r\n\r\n").encode()
            chunk = line * (MB // len(line))
            for _ in range(300):
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        try:
            r = httpx.post(f"{base}/v1/files", content=body(), timeout=120,
                           headers={"Authorization": f"Bearer {key}",
                                    "Content-Type": f"multipart/form-data; boundary={boundary}"})
            status = r.status_code
            assert r.json()["error"]["code"] == "file_too_large"
        except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
            status = 413  # the server closed the connection after answering 413 mid-stream
        growth = server.memory_info().rss - before
        assert status == 413
        assert growth < 48 * MB, f"server RSS grew by {growth / MB:.0f} MB"
        # an upload under the limit still works (8 MB)
        small = line * (8 * MB // len(line))
        ok = httpx.post(f"{base}/v1/files", files={"file": ("ok.jsonl", small)}, data={"purpose": "fine-tune"},
                        headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert ok.status_code == 200 and ok.json()["bytes"] == len(small)
        assert server.memory_info().rss - before < 64 * MB
    finally:
        stop(proc)
