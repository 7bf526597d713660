"""Jobs API on SQLite and PostgreSQL, without a worker: validation, idempotency, listing, cancel, isolation."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api


def dpo_body(file_id: str, **hyper: Any) -> dict[str, Any]:
    return {"model": "tiny-random-llama", "training_file": file_id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": hyper}}}


def test_create_job_fills_defaults_and_queues(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**dpo_body(f["id"], beta=0.2), "seed": 7})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["seed"] == 7
    assert job["id"].startswith("ftjob-") and job["organization_id"].startswith("org-")
    hp = job["method"]["dpo"]["hyperparameters"]
    assert hp["beta"] == 0.2 and hp["loss_type"] == "sigmoid" and job["hyperparameters"] == hp
    assert job["training_type"]["type"] == "lora"
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?order=asc", headers=headers).json()
    assert [e["message"] for e in events["data"]][-1] == "Job queued"
    assert api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["id"] == job["id"]


@pytest.mark.parametrize(("body_patch", "param"), [
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"betaa": 1}}}}, "method.dpo.hyperparameters.betaa"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": "two"}}}},
     "method.dpo.hyperparameters.n_epochs"),
    ({"method": {"type": "rlhf"}}, "method.type"),
    ({"colour": "blue"}, "colour"),
    ({"training_type": {"type": "lora", "rank": 8}}, "training_type.rank"),
])
def test_bad_spec_is_400_naming_the_field(api: Api, upload, body_patch: dict[str, Any], param: str) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**dpo_body(f["id"]), **body_patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"]


def test_missing_model_and_files_are_400_or_404(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**dpo_body(f["id"]), "model": "gpt-9"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=dpo_body("file-nope"))
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"


def test_file_of_wrong_format_or_invalid_is_refused(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    sft = upload(headers, [{"prompt": "hi", "completion": "hello"}])
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=dpo_body(sft["id"]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format"
    bad = upload(headers, b"{nope\n")
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=dpo_body(bad["id"]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_training_file"
    assert "line 1" in r.json()["error"]["message"]


def test_idempotency_key_returns_first_job_and_409_on_other_body(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    h = {**headers, "Idempotency-Key": "retry-1"}
    first = api.client.post("/v1/fine_tuning/jobs", headers=h, json=dpo_body(f["id"]))
    again = api.client.post("/v1/fine_tuning/jobs", headers=h, json=dpo_body(f["id"]))
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert len(api.client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"]) == 1
    other = api.client.post("/v1/fine_tuning/jobs", headers=h, json=dpo_body(f["id"], beta=0.5))
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_list_pagination_and_cancel(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    ids = [api.client.post("/v1/fine_tuning/jobs", headers=headers, json=dpo_body(f["id"])).json()["id"]
           for _ in range(3)]
    page = api.client.get("/v1/fine_tuning/jobs?limit=2", headers=headers).json()
    assert page["has_more"] is True and [j["id"] for j in page["data"]] == ids[::-1][:2]
    rest = api.client.get(f"/v1/fine_tuning/jobs?limit=2&after={page['data'][-1]['id']}", headers=headers).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = api.client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=headers)
    assert again.status_code == 409


def test_other_organization_sees_404_on_every_job_endpoint(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = api.key("acme"), api.key("globex")
    f = upload(mine)
    job = api.client.post("/v1/fine_tuning/jobs", headers=mine, json=dpo_body(f["id"])).json()
    base = f"/v1/fine_tuning/jobs/{job['id']}"
    for path in (base, f"{base}/events", f"{base}/checkpoints", f"{base}/metrics", f"{base}/adapter",
                 f"{base}/checkpoints/ftckpt-x/content"):
        assert api.client.get(path, headers=theirs).status_code == 404, path
    assert api.client.post(f"{base}/cancel", headers=theirs).status_code == 404
    # and their job may not train on my file
    r = api.client.post("/v1/fine_tuning/jobs", headers=theirs, json=dpo_body(f["id"]))
    assert r.status_code == 404
    assert api.client.get("/v1/fine_tuning/jobs", headers=theirs).json()["data"] == []


def test_models_lists_the_registry(api: Api) -> None:
    data = api.client.get("/v1/models", headers=api.key("acme")).json()["data"]
    assert {"SmolLM2-135M-Instruct", "tiny-random-llama"} <= {m["id"] for m in data}


def test_health_ready_and_metrics(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").status_code == 200
    headers = api.key("acme")
    f = upload(headers)
    api.client.post("/v1/fine_tuning/jobs", headers=headers, json=dpo_body(f["id"]))
    text = api.client.get("/metrics").text
    assert 'alignd_jobs{status="queued"} 1.0' in text
    assert 'alignd_http_requests_total{method="POST",route="/v1/fine_tuning/jobs",status="200"}' in text
    assert 'alignd_queue_depth{queue="alignd"} 1.0' in text
