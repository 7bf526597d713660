"""A DPO job through the whole service with real processes.

Production parts: PostgreSQL, Redis as the Celery broker, a real worker process, S3 on moto's
server. Embedded: ``alignd serve`` (SQLite, filesystem broker, local objects) driven over HTTP.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, REDIS_URL, Api, _api, jsonl
from tests.processes import alignd, celery_worker, free_port, stop, wait_for_job, wait_http

JOB = {"model": "tiny-random-llama", "seed": 3, "suffix": "e2e",
       "method": {"type": "dpo", "dpo": {"hyperparameters": {
           "batch_size": 4, "max_steps": 4, "checkpoint_every_steps": 2, "learning_rate": 1e-3}}}}


def check_adapter(archive: bytes, tmp: Path) -> None:
    """The archive extracts to a directory peft loads, and training moved LoRA's B away from zero."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    target = tmp / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in target.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(str(MODEL_CACHE / "tiny-random-llama"))
    model = PeftModel.from_pretrained(base, str(target))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0


def check_finished_job(get: Any, job: dict[str, Any]) -> None:
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"].startswith("ft:tiny-random-llama:") and job["fine_tuned_model"].endswith(job["id"])
    assert job["progress"] == {"step": 4, "total_steps": 4} and job["trained_tokens"] > 0
    loss = get(f"/v1/fine_tuning/jobs/{job['id']}/metrics?name=loss").json()["data"]
    assert [p["step"] for p in loss] == [1, 2, 3, 4]
    assert abs(loss[0]["value"] - math.log(2)) < 1e-5  # policy == reference at step 1
    assert loss[-1]["value"] < loss[0]["value"]
    names = {p["name"] for p in get(f"/v1/fine_tuning/jobs/{job['id']}/metrics?step_from=2&step_to=2").json()["data"]}
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "grad_norm", "learning_rate"} <= names
    ckpts = get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts] == [4, 2]
    events = [e["message"] for e in get(f"/v1/fine_tuning/jobs/{job['id']}/events?order=asc&limit=100").json()["data"]]
    assert events[0].startswith("Validated training file") and events[-1] == "The job has successfully completed"
    assert sum(m.startswith("Step ") for m in events) == 4


def production_env(tmp_path: Path, postgres_url: str, s3_endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        "ALIGND_DATA_DIR": str(tmp_path / "data"),
        "ALIGND_DATABASE_URL": postgres_url,
        "ALIGND_BROKER_URL": REDIS_URL,
        "ALIGND_QUEUE": "alignd-test-" + secrets.token_hex(4),
        "ALIGND_STORAGE_URL": f"s3://alignd-e2e/{secrets.token_hex(4)}",
        "ALIGND_S3_ENDPOINT_URL": s3_endpoint,
        "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
    }


def test_dpo_job_on_redis_worker_postgres_and_s3(tmp_path: Path, postgres_url: str, s3_endpoint: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    env = production_env(tmp_path, postgres_url, s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    assert settings.storage.url.startswith("s3://") and not settings.broker.embedded
    api_gen = _api(settings)
    api: Api = next(api_gen)
    try:
        headers = api.key("acme")

        def get(path: str) -> httpx.Response:
            return api.client.get(path, headers=headers)

        f = api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                            data={"purpose": "fine-tune"}).json()
        with celery_worker(settings, env, tmp_path / "worker.log"):
            job = api.client.post("/v1/fine_tuning/jobs", headers=headers,
                                  json={**JOB, "training_file": f["id"]}).json()
            job = wait_for_job(get, job["id"], timeout=300)
        if job["status"] != "succeeded":
            print((tmp_path / "worker.log").read_text()[-5000:])
        check_finished_job(get, job)
        adapter = get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
        assert adapter.status_code == 200 and adapter.headers["content-type"].startswith("application/gzip")
        check_adapter(adapter.content, tmp_path)
        ckpt = get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][-1]
        content = get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{ckpt['id']}/content")
        assert content.status_code == 200 and content.content[:2] == b"\x1f\x8b"
        assert api.state.store.exists(f"jobs/{job['id']}/attempt_1/adapter.tar.gz")  # really in S3
        models = {m["id"] for m in get("/v1/models").json()["data"]}
        assert job["fine_tuned_model"] in models
        other = api.key("globex")
        assert api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter", headers=other).status_code == 404
    finally:
        next(api_gen, None)


def test_embedded_serve_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE)}
    key = alignd("keys", "create", "--org", "acme", env=env).strip()
    assert key.startswith("sk-alignd-")
    port = free_port()
    import subprocess
    import sys

    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        f = client.post("/v1/files", files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
        job = client.post("/v1/fine_tuning/jobs", json={**JOB, "training_file": f["id"]}).json()
        job = wait_for_job(client.get, job["id"], timeout=300)
        if job["status"] != "succeeded":
            print((tmp_path / "serve.log").read_text()[-5000:])
        check_finished_job(client.get, job)
        check_adapter(client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter").content, tmp_path)
        assert (tmp_path / "data" / "alignd.db").exists()
        assert (tmp_path / "data" / "objects" / "jobs" / job["id"] / "attempt_1" / "adapter.tar.gz").exists()
    finally:
        stop(proc)
        log.close()
