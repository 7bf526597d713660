"""Resume, not restart: SIGKILL the worker after its first checkpoint, pause/resume, with real processes.

The resumed job keeps its id, trains every step exactly once (the loss series has no gap and no
repeat) and ends with the same adapter as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from service.reconciler import ReconcilerSettings, reconcile_once
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, _api, make_settings
from tests.processes import celery_worker, wait_for_job

STEPS = 24
BODY = {"model": "tiny-random-llama", "seed": 11,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {
            "batch_size": 2, "max_steps": STEPS, "n_epochs": 4, "checkpoint_every_steps": 4,
            "learning_rate": 5e-4}}}}


@pytest.fixture
def env_and_api(tmp_path: Path) -> Iterator[tuple[dict[str, str], Api, Path]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
            "ALIGND_HEARTBEAT_INTERVAL": "0.5"}
    gen = _api(make_settings(tmp_path / "data"))
    api = next(gen)
    yield env, api, tmp_path
    next(gen, None)


def adapter_tensors(api: Api, headers: dict[str, str], job_id: str) -> dict[str, torch.Tensor]:
    archive = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", headers=headers).content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return load_safetensors(member.read())


def loss_steps(api: Api, headers: dict[str, str], job_id: str) -> list[int]:
    data = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics?name=loss", headers=headers).json()["data"]
    return [p["step"] for p in data]


def test_sigkill_after_first_checkpoint_resumes_to_the_same_adapter(env_and_api) -> None:  # type: ignore[no-untyped-def]
    env, api, tmp = env_and_api
    settings = make_settings(tmp / "data")
    headers = api.key("acme")
    f = api.client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                        files={"file": ("p.jsonl", "\n".join(__import__("json").dumps(r) for r in PREFERENCE_ROWS))}
                        ).json()
    get = lambda p: api.client.get(p, headers=headers)  # noqa: E731
    job = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**BODY, "training_file": f["id"]}).json()
    with celery_worker(settings, env, tmp / "worker1.log") as worker:
        deadline = time.time() + 180
        while time.time() < deadline and not get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]:
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)  # the whole worker: main process and pool child
        worker.wait()
    killed_at = get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert killed_at["status"] == "running" and killed_at["progress"]["step"] < STEPS
    # the reconciler notices the silent heartbeat and re-queues the job under the same id
    cfg = ReconcilerSettings(heartbeat_timeout=2.0, requeue_after=0, max_restarts=3)
    time.sleep(2.5)
    assert reconcile_once(api.state, cfg)["recovered"] == 1
    with celery_worker(settings, env, tmp / "worker2.log"):
        done = wait_for_job(get, job["id"], timeout=240)
        assert done["status"] == "succeeded", (tmp / "worker2.log").read_text()[-3000:]
        reference = api.client.post("/v1/fine_tuning/jobs", headers=headers,
                                    json={**BODY, "training_file": f["id"]}).json()
        assert wait_for_job(get, reference["id"], timeout=240)["status"] == "succeeded"
    assert done["id"] == job["id"]
    assert loss_steps(api, headers, job["id"]) == list(range(1, STEPS + 1))  # each step once, no gap
    events = [e["message"] for e in get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=500").json()["data"]]
    resumed = [m for m in events if m.startswith("resumed from step")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) % 4 == 0
    ours, theirs = adapter_tensors(api, headers, job["id"]), adapter_tensors(api, headers, reference["id"])
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    ref_losses = get(f"/v1/fine_tuning/jobs/{reference['id']}/metrics?name=loss").json()["data"]
    our_losses = get(f"/v1/fine_tuning/jobs/{job['id']}/metrics?name=loss").json()["data"]
    assert [round(p["value"], 5) for p in our_losses] == [round(p["value"], 5) for p in ref_losses]


PPO_STEPS = 6


def checkpoint_steps(api: Api, headers: dict[str, str], job_id: str) -> list[int]:
    data = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints?limit=100", headers=headers).json()["data"]
    return sorted(c["step_number"] for c in data)


def test_ppo_sigkill_after_a_checkpoint_resumes_to_the_same_policy(env_and_api) -> None:  # type: ignore[no-untyped-def]
    """PPO on the shared loop: the checkpoint holds policy, value, optimizer, KL controller and sampler,
    so the resumed job's steps k+1.. are the uninterrupted run's and its adapter is the same."""
    import json

    env, api, tmp = env_and_api
    settings = make_settings(tmp / "data")
    headers = api.key("acme")
    get = lambda p: api.client.get(p, headers=headers)  # noqa: E731

    def upload(rows: list[dict[str, object]]) -> str:
        content = "\n".join(json.dumps(r) for r in rows)
        return str(api.client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                                   files={"file": ("f.jsonl", content)}).json()["id"])

    def create(body: dict[str, object]) -> dict[str, object]:
        r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    with celery_worker(settings, env, tmp / "worker0.log"):
        rm = create({"model": "tiny-random-llama", "training_file": upload(PREFERENCE_ROWS), "seed": 1,
                     "method": {"type": "reward_model", "reward_model": {"hyperparameters": {
                         "batch_size": 8, "max_steps": 2, "learning_rate": 1e-3}}}})
        rm = wait_for_job(get, str(rm["id"]), timeout=240)
        assert rm["status"] == "succeeded", (tmp / "worker0.log").read_text()[-3000:]
    prompts = upload([{"prompt": r["prompt"]} for r in PREFERENCE_ROWS[:8]])
    body = {"model": "tiny-random-llama", "training_file": prompts, "seed": 5,
            "method": {"type": "ppo", "ppo": {"hyperparameters": {
                "reward_model": rm["fine_tuned_model"], "rollout_batch_size": 4, "mini_batch_size": 2,
                "max_new_tokens": 3, "ppo_epochs": 2, "temperature": 0.7, "learning_rate": 1e-3,
                "n_epochs": 3, "max_steps": PPO_STEPS, "checkpoint_every_steps": 2}}}}
    job = create(body)
    with celery_worker(settings, env, tmp / "worker1.log") as worker:
        deadline = time.time() + 180
        while time.time() < deadline and not checkpoint_steps(api, headers, str(job["id"])):
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    killed_at = get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert killed_at["status"] == "running" and killed_at["progress"]["step"] < PPO_STEPS
    time.sleep(2.5)
    cfg = ReconcilerSettings(heartbeat_timeout=2.0, requeue_after=0, max_restarts=3)
    assert reconcile_once(api.state, cfg)["recovered"] == 1
    with celery_worker(settings, env, tmp / "worker2.log"):
        done = wait_for_job(get, str(job["id"]), timeout=300)
        assert done["status"] == "succeeded", (tmp / "worker2.log").read_text()[-3000:]
        reference = create(body)
        assert wait_for_job(get, str(reference["id"]), timeout=300)["status"] == "succeeded"
    assert loss_steps(api, headers, str(job["id"])) == list(range(1, PPO_STEPS + 1))  # each step once
    assert checkpoint_steps(api, headers, str(job["id"])) == [2, 4, 6]  # each checkpoint row once
    events = [e["message"] for e in get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=500").json()["data"]]
    resumed = [m for m in events if m.startswith("resumed from step")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) in (2, 4)
    ours, theirs = adapter_tensors(api, headers, str(job["id"])), adapter_tensors(api, headers, str(reference["id"]))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
    for metric in ("objective/scores", "loss/value_avg", "kl_coef"):
        series = [get(f"/v1/fine_tuning/jobs/{j}/metrics?name={metric}").json()["data"]
                  for j in (job["id"], reference["id"])]
        assert [round(p["value"], 5) for p in series[0]] == [round(p["value"], 5) for p in series[1]], metric


RFT_STEPS = 6


def test_reinforcement_sigkill_after_a_checkpoint_resumes_to_the_same_adapter(env_and_api) -> None:  # type: ignore[no-untyped-def]
    """A GRPO job with a python grader (in its sandbox) killed with its worker after a checkpoint:
    the reconciler re-queues it, another worker resumes it, and it ends as an uninterrupted run."""
    import json

    env, api, tmp = env_and_api
    settings = make_settings(tmp / "data")
    headers = api.key("acme")
    get = lambda p: api.client.get(p, headers=headers)  # noqa: E731
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}], "answer": str(a + b)}
            for a in range(4) for b in range(2)]
    training = api.client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                               files={"file": ("rft.jsonl", "\n".join(json.dumps(r) for r in rows))}).json()["id"]
    grader = {"type": "python", "name": "vowels", "source": (
        "def grade(sample, item):\n"
        "    text = sample['output_text']\n"
        "    return sum(c in 'aeiou' for c in text.lower()) / max(len(text), 1)\n")}
    body = {"model": "tiny-random-llama", "training_file": training, "seed": 3,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
                "batch_size": 2, "group_size": 4, "max_new_tokens": 5, "learning_rate": 1e-3, "n_epochs": 2,
                "max_steps": RFT_STEPS, "checkpoint_every_steps": 2}}}}

    def create() -> str:
        r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    job = create()
    with celery_worker(settings, env, tmp / "worker1.log") as worker:
        deadline = time.time() + 180
        while time.time() < deadline and not checkpoint_steps(api, headers, job):
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert get(f"/v1/fine_tuning/jobs/{job}").json()["progress"]["step"] < RFT_STEPS
    time.sleep(2.5)
    cfg = ReconcilerSettings(heartbeat_timeout=2.0, requeue_after=0, max_restarts=3)
    assert reconcile_once(api.state, cfg)["recovered"] == 1
    with celery_worker(settings, env, tmp / "worker2.log"):
        done = wait_for_job(get, job, timeout=300)
        assert done["status"] == "succeeded", (tmp / "worker2.log").read_text()[-3000:]
        reference = create()
        assert wait_for_job(get, reference, timeout=300)["status"] == "succeeded"
    assert loss_steps(api, headers, job) == list(range(1, RFT_STEPS + 1))
    assert checkpoint_steps(api, headers, job) == [2, 4, 6]
    ours, theirs = adapter_tensors(api, headers, job), adapter_tensors(api, headers, reference)
    assert ours.keys() == theirs.keys() and any(float(t.abs().max()) > 0 for k, t in ours.items() if "lora_B" in k)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
    series = [[round(p["value"], 5) for p in get(f"/v1/fine_tuning/jobs/{j}/metrics?name=reward").json()["data"]]
              for j in (job, reference)]
    assert series[0] == series[1] and len(series[0]) == RFT_STEPS


def test_pause_checkpoints_and_resume_continues(env_and_api) -> None:  # type: ignore[no-untyped-def]
    env, api, tmp = env_and_api
    settings = make_settings(tmp / "data")
    headers = api.key("acme")
    get = lambda p: api.client.get(p, headers=headers)  # noqa: E731
    f = api.client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                        files={"file": ("p.jsonl", "\n".join(__import__("json").dumps(r) for r in PREFERENCE_ROWS))}
                        ).json()
    body = {**BODY, "method": {"type": "dpo", "dpo": {"hyperparameters": {
        "batch_size": 2, "max_steps": 40, "n_epochs": 5, "learning_rate": 5e-4}}}}
    with celery_worker(settings, env, tmp / "worker.log"):
        job = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "training_file": f["id"]}).json()
        deadline = time.time() + 120
        while time.time() < deadline and get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 3:
            time.sleep(0.05)
        assert api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=headers).status_code == 200
        paused = wait_for_job(get, job["id"], timeout=60, until={"paused"})
        paused_step = paused["progress"]["step"]
        assert 3 <= paused_step < 40
        ckpts = get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert ckpts[0]["step_number"] == paused_step
        time.sleep(1.0)  # the worker is free and the job stays put
        assert get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "paused"
        resumed = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=headers)
        assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
        done = wait_for_job(get, job["id"], timeout=180)
    assert done["status"] == "succeeded"
    assert loss_steps(api, headers, job["id"]) == list(range(1, 41))
    events = [e["message"] for e in get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=500").json()["data"]]
    assert f"resumed from step {paused_step}" in events
    assert api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=headers).status_code == 409
