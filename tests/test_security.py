"""Auth and isolation: hashed keys, revocation, a cross-organization matrix over every route,
idempotent creates under concurrent duplicates (live server), storage keys from ids only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import select, text

from service.db.engine import session_scope
from service.db.models import ApiKey, File
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, jsonl
from tests.processes import alignd, free_port, stop, wait_http


def test_keys_are_stored_hashed(api: Api) -> None:
    headers = api.key("acme")
    secret = headers["Authorization"].removeprefix("Bearer ")
    with session_scope(api.state.sessions) as s:
        rows = s.execute(text("SELECT * FROM api_keys")).all()
        assert rows and all(secret not in " ".join(map(str, row)) for row in rows)
        assert len(s.scalars(select(ApiKey.key_hash)).first() or "") == 64


def test_revoked_key_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE)}
    created = subprocess.run([str(Path(sys.executable).parent / "alignd"), "keys", "create", "--org", "acme"],
                             env=env, capture_output=True, text=True, check=True)
    secret = created.stdout.strip()
    key_id = re.search(r"key id (\S+)", created.stderr).group(1)  # type: ignore[union-attr]
    from litestar.testing import TestClient

    from service.app import create_app
    from service.settings import Settings

    os.environ["ALIGND_DATA_DIR"] = str(tmp_path / "data")
    try:
        app = create_app(Settings.from_env(tmp_path / "data"))
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {secret}"}
            assert client.get("/v1/files", headers=headers).status_code == 200
            assert "revoked" in alignd("keys", "revoke", key_id, env=env)
            assert client.get("/v1/files", headers=headers).status_code == 401
    finally:
        os.environ.pop("ALIGND_DATA_DIR", None)


def _routes(api: Api) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves under /v1 that names an object."""
    app = api.client.app
    routes = []
    for route in app.routes:
        if not route.path.startswith("/v1/") or "{" not in route.path:
            continue
        for method in sorted(getattr(route, "methods", set()) - {"OPTIONS", "HEAD"}):
            routes.append((method, route.path))
    return routes


def test_cross_organization_matrix_over_every_route(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = api.key("acme"), api.key("globex")
    f = upload(mine)
    job = api.client.post("/v1/fine_tuning/jobs", headers=mine, json={
        "model": "tiny-random-llama", "training_file": f["id"], "method": {"type": "dpo"}}).json()
    ids = {"file_id": f["id"], "job_id": job["id"], "checkpoint_id": "ftckpt-none"}
    routes = _routes(api)
    assert len(routes) >= 10
    for method, template in routes:
        path = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: ids[m.group(1)], template)
        r = api.client.request(method, path, headers=theirs, json={} if method == "POST" else None)
        assert r.status_code == 404, (method, template, r.status_code, r.text)
        assert r.json()["error"]["code"].endswith("not_found")  # the same answer as for an id that never existed
    # and the owner still sees everything
    assert api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=mine).status_code == 200


def test_storage_keys_come_from_ids_not_filenames(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers, name="../../../../etc/passwd")
    with session_scope(api.state.sessions) as s:
        row = s.get(File, f["id"])
        assert row is not None and row.storage_key == f"files/{f['id']}.jsonl"
    assert api.client.get(f"/v1/files/{f['id']}/content", headers=headers).content == jsonl(PREFERENCE_ROWS)


def test_concurrent_duplicate_creates_make_one_job_and_one_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE)}
    key = alignd("keys", "create", "--org", "acme", env=env).strip()
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "api", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        auth = {"Authorization": f"Bearer {key}"}

        def upload_once(_: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/files", headers={**auth, "Idempotency-Key": "file-1"},
                              files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))}, data={"purpose": "fine-tune"},
                              timeout=60)

        with ThreadPoolExecutor(8) as pool:
            files = list(pool.map(upload_once, range(8)))
        assert {r.status_code for r in files} == {200}
        assert len({r.json()["id"] for r in files}) == 1
        file_id = files[0].json()["id"]
        body = {"model": "tiny-random-llama", "training_file": file_id, "method": {"type": "dpo"}}

        def create_once(_: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/fine_tuning/jobs", headers={**auth, "Idempotency-Key": "job-1"},
                              json=body, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            jobs = list(pool.map(create_once, range(8)))
        assert {r.status_code for r in jobs} == {200}, [r.text for r in jobs]
        assert len({r.json()["id"] for r in jobs}) == 1
        listed = httpx.get(f"{base}/v1/fine_tuning/jobs", headers=auth).json()["data"]
        assert len(listed) == 1
        assert len(httpx.get(f"{base}/v1/files", headers=auth).json()["data"]) == 1
    finally:
        stop(proc)
