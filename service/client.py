"""A small typed HTTP client for alignd's API, used by the demo, the CLI and tests.

It speaks only HTTP (httpx), so it works against any alignd deployment and pulls in nothing heavy.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class AligndError(Exception):
    """An API error envelope, with the HTTP status and the fields of ``error``."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status = status
        self.code = error.get("code")
        self.param = error.get("param")
        self.message = error.get("message")


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60) -> None:
        base = base_url or os.environ.get("ALIGND_BASE_URL", "http://127.0.0.1:8000")
        key = api_key or os.environ.get("ALIGND_API_KEY", "")
        self.http = httpx.Client(base_url=base.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json().get("error", {})
            except ValueError:
                error = {"message": response.text[:500]}
            raise AligndError(response.status_code, error)
        return response.json()

    # files
    def upload_file(self, content: bytes | Path, filename: str = "data.jsonl",
                    idempotency_key: str | None = None) -> dict[str, Any]:
        if isinstance(content, Path):
            filename, content = content.name, content.read_bytes()
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/files", files={"file": (filename, content)},  # type: ignore[no-any-return]
                                         data={"purpose": "fine-tune"}, headers=headers))

    def upload_rows(self, rows: list[dict[str, Any]], filename: str = "data.jsonl") -> dict[str, Any]:
        return self.upload_file(("\n".join(json.dumps(r) for r in rows) + "\n").encode(), filename)

    def list_files(self) -> list[dict[str, Any]]:
        return self._json(self.http.get("/v1/files"))["data"]  # type: ignore[no-any-return]

    def file(self, file_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/files/{file_id}"))  # type: ignore[no-any-return]

    def file_analysis(self, file_id: str, model: str | None = None) -> dict[str, Any]:
        params = {"model": model} if model else {}
        return self._json(self.http.get(f"/v1/files/{file_id}/analysis", params=params))  # type: ignore[no-any-return]

    # jobs
    def create_job(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/fine_tuning/jobs", json=body, headers=headers))  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/fine_tuning/jobs/{job_id}"))  # type: ignore[no-any-return]

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._json(self.http.get("/v1/fine_tuning/jobs", params={"limit": limit}))["data"]  # type: ignore[no-any-return]

    def job_action(self, job_id: str, action: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/fine_tuning/jobs/{job_id}/{action}"))  # type: ignore[no-any-return]

    def events(self, job_id: str, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"order": "asc", "limit": limit}
        if after:
            params["after"] = after
        return self._json(self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params))["data"]  # type: ignore[no-any-return]

    def metrics(self, job_id: str, name: str | None = None) -> list[dict[str, Any]]:
        params = {"name": name} if name else {}
        return self._json(self.http.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params=params))["data"]  # type: ignore[no-any-return]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._json(self.http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints"))["data"]  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.job_action(job_id, "cancel")

    def pause_job(self, job_id: str) -> dict[str, Any]:
        return self.job_action(job_id, "pause")

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return self.job_action(job_id, "resume")

    def download_adapter(self, job_id: str, target: Path, checkpoint_id: str | None = None) -> Path:
        """Extract the final adapter archive (or a checkpoint's) into ``target`` (a directory peft loads)."""
        path = (f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content" if checkpoint_id
                else f"/v1/fine_tuning/jobs/{job_id}/adapter")
        response = self.http.get(path)
        if response.status_code >= 400:
            self._json(response)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            tar.extractall(target, filter="data")
        return target

    def follow(self, job_id: str, poll: float = 1.0, timeout: float | None = None
               ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Yield (job, new events) until the job ends."""
        last: str | None = None
        deadline = time.time() + timeout if timeout else None

        def drain() -> list[dict[str, Any]]:  # every event since ``last``, however many pages
            nonlocal last
            out: list[dict[str, Any]] = []
            while True:
                page = self.events(job_id, after=last, limit=1000)
                if page:
                    last = page[-1]["id"]
                out.extend(page)
                if len(page) < 1000:
                    return out

        while True:
            new = drain()
            job = self.job(job_id)
            yield job, new
            if job["status"] in TERMINAL:
                tail = drain()
                if tail:
                    yield job, tail
                return
            if deadline and time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']}")
            time.sleep(poll)
