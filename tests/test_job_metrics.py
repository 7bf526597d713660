"""Per-job Prometheus series during a real DPO job, on the API and on the worker's own port; gone
once the job ends. (The Grafana dashboard's queries and the alert rules run against a real Prometheus
scraping a live service in ``test_prometheus.py``.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors

from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, LiveService, _api, make_settings
from tests.processes import celery_worker, free_port, wait_for_job

PER_JOB = (
    "alignd_job_step",
    "alignd_job_loss",
    "alignd_job_kl",
    "alignd_job_reward",
    "alignd_job_reward_accuracy",
    "alignd_job_tokens_per_second",
    "alignd_job_gpu_memory_bytes",
    "alignd_job_host_memory_bytes",
    "alignd_job_likelihood_displacement",
    "alignd_job_logps_drift",
    "alignd_job_margin_growth",
)


@dataclass
class Scrapes:
    job_id: str
    worker: str
    api_during: str
    worker_during: str
    api_after: str
    worker_after: str
    live: LiveService


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


def families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


def job_samples(text: str, job_id: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (name, tuple(sorted((k, v) for k, v in labels.items() if k not in ("job_id", "method")))): value
        for name, labels, value in samples(text)
        if labels.get("job_id") == job_id
    }


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapes]:
    """``live`` with the worker's metrics port on: a long DPO job, scraped while it runs and after cancel."""
    root = tmp_path_factory.mktemp("metrics")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {
        "ALIGND_DATA_DIR": str(root / "data"),
        "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
        "ALIGND_WORKER_METRICS_PORT": str(port),
    }
    settings = make_settings(root / "data")
    gen = _api(settings)
    api = next(gen)
    try:
        with celery_worker(settings, env, root / "worker.log"):
            live = LiveService(api, api.key("acme"), root / "worker.log")
            # every step trains on all the pairs, against reference log-probs stored with the job, so the
            # KL estimate can be checked from the policy's logged log-probs and that stored reference
            f = live.upload(PREFERENCE_ROWS)
            job = live.create_job(
                {
                    "model": "tiny-random-llama",
                    "training_file": f["id"],
                    "method": {
                        "type": "dpo",
                        "dpo": {
                            "hyperparameters": {
                                "batch_size": len(PREFERENCE_ROWS),
                                "n_epochs": 400,
                                "beta": 0.5,
                                "learning_rate": 1e-3,
                                "precompute_ref_log_probs": True,
                            }
                        },
                    },
                }
            )
            deadline = time.time() + 180
            while live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 3:
                assert time.time() < deadline, (root / "worker.log").read_text()[-3000:]
                time.sleep(0.3)
            worker_url = f"http://127.0.0.1:{port}/metrics"
            api_during = live.api.client.get("/metrics").text
            worker_during = httpx.get(worker_url, timeout=10).text
            with live.api.state.sessions() as session:
                from service.db.models import Job

                worker = session.get(Job, job["id"]).worker  # type: ignore[union-attr]
            r = live.api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=live.headers)
            assert r.status_code == 200
            wait_for_job(live.get, job["id"], timeout=60)
            api_after = live.api.client.get("/metrics").text
            worker_after = httpx.get(worker_url, timeout=10).text
            yield Scrapes(job["id"], worker or "", api_during, worker_during, api_after, worker_after, live)
    finally:
        next(gen, None)


def test_job_series_carry_job_id_and_method_while_it_runs(scrapes: Scrapes) -> None:
    series = job_samples(scrapes.api_during, scrapes.job_id)
    names = {name for name, _ in series}
    assert {
        "alignd_job_step",
        "alignd_job_loss",
        "alignd_job_kl",
        "alignd_job_reward",
        "alignd_job_reward_accuracy",
        "alignd_job_tokens_per_second",
        "alignd_job_host_memory_bytes",
    } <= names
    kinds = {dict(labels)["kind"] for name, labels in series if name == "alignd_job_reward"}
    assert kinds == {"chosen", "rejected", "margin"}
    sides = {dict(labels)["side"] for name, labels in series if name == "alignd_job_logps_drift"}
    assert sides == {"chosen", "rejected"}
    assert 0.0 <= series[("alignd_job_likelihood_displacement", ())] <= 1.0
    assert ("alignd_job_margin_growth", ()) in series  # step >= 3: a slope over at least two margins
    methods = {
        labels["method"]
        for _, labels, _ in samples(scrapes.api_during)
        if labels.get("job_id") == scrapes.job_id
    }
    assert methods == {"dpo"}
    assert series[("alignd_job_step", ())] >= 3
    assert 0.0 <= series[("alignd_job_reward_accuracy", ())] <= 1.0
    assert series[("alignd_job_host_memory_bytes", ())] > 50e6  # torch + a model: tens of MB at least
    assert series[("alignd_job_tokens_per_second", ())] > 0
    # DPO's KL estimate is the mean policy/reference log-ratio of the step's completions. Independently of
    # the rewards it is derived from: the policy's mean log-probs logged at that step (all pairs are in
    # every step) minus the mean of the reference log-probs the job stored before its first step.
    step = int(series[("alignd_job_step", ())])
    at_step = {p["name"]: p["value"] for p in scrapes.live.get(
        f"/v1/fine_tuning/jobs/{scrapes.job_id}/metrics?step_from={step}&step_to={step}").json()["data"]}
    stored = load_safetensors(scrapes.live.api.state.store.get_bytes(f"jobs/{scrapes.job_id}/ref_logps.safetensors"))
    reference = stored["train"]  # (pairs, [chosen, rejected]) sequence log-probs under the reference
    assert reference.shape == (len(PREFERENCE_ROWS), 2)
    expected = (at_step["logps/chosen"] + at_step["logps/rejected"]) / 2 - float(reference.mean(dim=0).sum()) / 2
    assert abs(expected) > 1e-3  # the policy has moved away from the reference: the check has teeth
    assert series[("alignd_job_kl", ())] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    # every per-job family is exposed (GPU memory has no sample on a CPU-only machine)
    assert set(PER_JOB) <= families(scrapes.api_during)
    by_status = {
        labels["status"]: v for name, labels, v in samples(scrapes.api_during) if name == "alignd_jobs"
    }
    assert by_status["running"] == 1
    assert any(
        name == "alignd_queue_depth" and labels == {"queue": "alignd"}
        for name, labels, _ in samples(scrapes.api_during)
    )


def test_the_worker_serves_its_own_jobs_series(scrapes: Scrapes) -> None:
    assert scrapes.worker.startswith("alignd-")  # the Celery node name, recorded by the claim
    on_worker = job_samples(scrapes.worker_during, scrapes.job_id)
    assert {("alignd_job_loss", ()), ("alignd_job_step", ())} <= on_worker.keys()
    assert "alignd_jobs" not in families(scrapes.worker_during)  # service-wide series stay on the API


def test_series_are_removed_when_the_job_ends(scrapes: Scrapes) -> None:
    assert job_samples(scrapes.api_after, scrapes.job_id) == {}
    assert job_samples(scrapes.worker_after, scrapes.job_id) == {}
    counts = {
        (labels["method"], labels["status"]): v
        for name, labels, v in samples(scrapes.api_after)
        if name == "alignd_job_duration_seconds_count"
    }
    assert counts[("dpo", "cancelled")] == 1
