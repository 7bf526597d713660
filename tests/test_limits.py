"""Limits: uploads refused while streaming (server RSS measured), JSON body limit, rate and active-job limits."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
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


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_streamed_oversized_upload_is_a_real_413_and_server_memory_stays_flat(tmp_path: Path) -> None:
    """A real server process: 300 MB streamed (chunked, no Content-Length) against a 64 MB limit. The
    client reads a real 413 (no broken pipe), and the server's *peak* RSS (``VmHWM``, reset just before
    the upload) stays within a few MB of where it was."""
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
        auth = {"Authorization": f"Bearer {key}"}
        line = jsonl(PREFERENCE_ROWS[:1])
        # warm the upload path once (imports, first allocations), then measure from there
        warm = httpx.post(f"{base}/v1/files", files={"file": ("w.jsonl", line)}, data={"purpose": "fine-tune"},
                          headers=auth, timeout=60)
        assert warm.status_code == 200
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _status_kib(proc.pid, "VmRSS")
        boundary = "alignd-boundary"

        def body() -> Iterator[bytes]:
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                   f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.jsonl\"\r\n"
                   "Content-Type: application/jsonl\r\n\r\n").encode()
            chunk = line * (MB // len(line))
            for _ in range(300):
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        r = httpx.post(f"{base}/v1/files", content=body(), timeout=120,
                       headers=auth | {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        peak_growth = _status_kib(proc.pid, "VmHWM") - before
        assert peak_growth < 48 * MB, f"server peak RSS grew by {peak_growth / MB:.0f} MB"
        # declared too large: refused on Content-Length, still a readable 413
        big = httpx.post(f"{base}/v1/files", content=b"x" * (65 * MB), timeout=120,
                         headers=auth | {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert big.status_code == 413
        # an upload under the limit still works (8 MB)
        small = line * (8 * MB // len(line))
        ok = httpx.post(f"{base}/v1/files", files={"file": ("ok.jsonl", small)}, data={"purpose": "fine-tune"},
                        headers=auth, timeout=120)
        assert ok.status_code == 200 and ok.json()["bytes"] == len(small)
    finally:
        stop(proc)
