"""``resources: {"nodes": 2, "gpus_per_node": 1}`` through a real worker: the local backend's node groups.

The worker claims the job and supervises it (``workers.multinode`` → ``JobSetSupervisor`` with
``LocalBackend``): two torchrun agents on this machine, one per node, meet at a c10d rendezvous on
localhost and run one gloo rank each. Nothing is mocked: the API, SQLite, the Celery worker, torchrun
and torch.distributed are the real ones.

* The 2-node DPO job (LoRA: DDP over the two ranks) gives the 1-process loss curve (each rank takes
  half of every global batch).
* A full fine-tune on 2 nodes is sharded with FSDP2 over both, with sharded checkpoints. Killing one
  node's process group (SIGKILL, like a lost machine) fails the attempt: the other node's rank
  loses its peer and exits without recording anything, the supervisor deletes the group and
  submits it again, and the new attempt resumes from the latest (sharded) checkpoint. The job
  succeeds with every step's loss recorded exactly once, on the 1-process curve.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil
import pytest

from tests.conftest import PREFERENCE_ROWS, LiveService
from tests.processes import wait_for_job

STEPS = 16  # 32 pairs, 4 a step, 2 epochs


def dpo_job(file_id: str, resources: dict[str, int] | None, full: bool = False) -> dict[str, Any]:
    hp = {"batch_size": 4, "n_epochs": 2, "learning_rate": 1e-4 if full else 1e-3, "checkpoint_every_steps": 2}
    body: dict[str, Any] = {"model": "tiny-random-llama", "training_file": file_id, "seed": 11,
                            "method": {"type": "dpo", "dpo": {"hyperparameters": hp}}}
    if full:
        body["training_type"] = {"type": "full"}
    if resources:
        body["resources"] = resources
    return body


def series(live: LiveService, job_id: str, name: str) -> list[tuple[int, float]]:
    data = live.get(f"/v1/fine_tuning/jobs/{job_id}/metrics?name={name}").json()["data"]
    return [(p["step"], p["value"]) for p in data]


def events(live: LiveService, job_id: str) -> list[dict[str, Any]]:
    return live.get(f"/v1/fine_tuning/jobs/{job_id}/events?order=asc&limit=500").json()["data"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def one_process(live: LiveService) -> tuple[str, dict[str, Any]]:
    """The training file and the same jobs (LoRA, full) in one process: the curves 2-node jobs must give."""
    f = live.upload(PREFERENCE_ROWS * 2)
    jobs = {"lora": live.run(dpo_job(f["id"], None), timeout=600),
            "full": live.run(dpo_job(f["id"], None, full=True), timeout=600)}
    for job in jobs.values():
        assert job["status"] == "succeeded", job["error"]
    return f["id"], jobs


def test_multinode_two_local_nodes_reproduce_the_one_process_loss_curve(
        live: LiveService, one_process: tuple[str, dict[str, Any]]) -> None:
    file_id, jobs = one_process
    one = jobs["lora"]
    two = live.run(dpo_job(file_id, {"nodes": 2, "gpus_per_node": 1}), timeout=900)
    assert two["status"] == "succeeded", (two["error"], live.log.read_text()[-4000:])
    assert two["resources"] == {"gpus": 2, "nodes": 2, "gpus_per_node": 1, "strategy": "ddp", "queue": "alignd"}
    print("\nstep  loss (1 process)  loss (2 nodes × 1 rank)")
    for (step, a), (_, b) in zip(series(live, one["id"], "loss"), series(live, two["id"], "loss"), strict=True):
        print(f"{step:>4}  {a:.7f}         {b:.7f}")
    for name in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "learning_rate"):
        a, b = series(live, one["id"], name), series(live, two["id"], name)
        assert [s for s, _ in b] == [s for s, _ in a] == list(range(1, STEPS + 1)), name
        assert [v for _, v in b] == pytest.approx([v for _, v in a], abs=1e-5), name
    assert series(live, two["id"], "num_tokens") == series(live, one["id"], "num_tokens")  # the same data
    messages = [e["message"] for e in events(live, two["id"])]
    assert f"Submitted {two['id']}: 2 nodes × 1 GPUs" in messages
    assert "All 2 nodes are running" in messages
    assert sum(m.startswith("Node ") and m.endswith(": running") for m in messages) == 2
    assert sum(m.startswith("Step ") for m in messages) == STEPS  # rank 0 reports, once per step
    adapter = live.api.client.get(f"/v1/fine_tuning/jobs/{two['id']}/adapter", headers=live.headers)
    assert adapter.status_code == 200


def _node_agent(job_id: str, node: int) -> psutil.Process | None:
    """The torchrun agent of one local node of ``job_id`` (its ``ALIGND_NODE_RANK``)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "torch.distributed.run" in cmdline and job_id in cmdline and \
                    proc.environ().get("ALIGND_NODE_RANK") == str(node):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_multinode_fsdp_a_killed_node_fails_the_attempt_and_the_job_resumes(
        live: LiveService, one_process: tuple[str, dict[str, Any]]) -> None:
    file_id, jobs = one_process
    one = jobs["full"]
    job = live.create_job(dpo_job(file_id, {"nodes": 2, "gpus_per_node": 1}, full=True))
    assert job["resources"]["strategy"] == "fsdp"
    deadline = time.time() + 600
    while live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 3:
        assert time.time() < deadline, live.log.read_text()[-4000:]
        time.sleep(0.2)
    agent = _node_agent(job["id"], 1)
    assert agent is not None
    os.killpg(agent.pid, signal.SIGKILL)  # node 2 is lost: its agent, and with it its rank
    final = wait_for_job(live.get, job["id"], timeout=900)
    assert final["status"] == "succeeded", (final["error"], live.log.read_text()[-4000:])
    log = events(live, job["id"])
    failed = [e for e in log if e["level"] == "error" and e["message"].startswith("Node 2 of 2")]
    assert failed and "killed by SIGKILL" in failed[0]["message"], [e["message"] for e in log]
    restart = [e for e in log if "Restarting all 2 nodes from step" in e["message"]]
    assert len(restart) == 1 and restart[0]["data"]["restart"] == 1
    resume_step = restart[0]["data"]["resume_step"]
    assert resume_step >= 2 and resume_step % 2 == 0  # a checkpoint every 2 steps
    assert f"resumed from step {resume_step}" in [e["message"] for e in log]
    print(f"\n{failed[0]['message']}\n{restart[0]['message']}")
    # every checkpoint still listed (the last three) is a whole sharded one under a single attempt's
    # prefix; the resumed-from one, if retired since, left no shard behind
    listed = live.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints?limit=50").json()["data"]
    kept = sorted(c["step_number"] for c in listed)
    assert 1 <= len(kept) <= 3, kept
    keys = live.api.state.store.list(f"jobs/{job['id']}/")
    for step in kept:
        shards = [k for k in keys if f"/step_{step}/shards/" in k]
        assert len({k.split("/")[2] for k in shards}) == 1 and shards[0].split("/")[2].startswith("attempt_"), shards
        assert sorted(k.rsplit("/", 1)[1] for k in shards) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    if resume_step not in kept:
        assert not [k for k in keys if f"/step_{resume_step}/" in k]
    assert sum(m["message"] == f"Submitted {job['id']}: 2 nodes × 1 GPUs" for m in log) == 2
    # every step's loss once, and the interrupted job's curve is the uninterrupted one
    loss = series(live, job["id"], "loss")
    print("\nstep  loss (1 process, full)  loss (2 nodes FSDP, node 2 killed after step 3)")
    for (step, a), (_, b) in zip(series(live, one["id"], "loss"), loss, strict=True):
        print(f"{step:>4}  {a:.7f}         {b:.7f}")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1))
    assert [v for _, v in loss] == pytest.approx([v for _, v in series(live, one["id"], "loss")], abs=1e-5)
    # rank 0 records the end state, then the ranks exit and the supervisor removes the group
    gone = time.time() + 60
    while (_node_agent(job["id"], 0) or _node_agent(job["id"], 1)) and time.time() < gone:
        time.sleep(0.5)
    assert _node_agent(job["id"], 0) is None and _node_agent(job["id"], 1) is None  # nothing left running


def test_multinode_pause_checkpoints_removes_the_nodes_and_resume_resubmits(
        live: LiveService, one_process: tuple[str, dict[str, Any]]) -> None:
    file_id, jobs = one_process
    job = live.create_job(dpo_job(file_id, {"nodes": 2, "gpus_per_node": 1}))
    deadline = time.time() + 600
    while live.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 3:
        assert time.time() < deadline, live.log.read_text()[-4000:]
        time.sleep(0.2)
    assert live.api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=live.headers).status_code == 200
    paused = wait_for_job(live.get, job["id"], timeout=300, until={"paused", "failed"})
    assert paused["status"] == "paused", paused["error"]
    step = paused["progress"]["step"]
    gone = time.time() + 60
    while (_node_agent(job["id"], 0) or _node_agent(job["id"], 1)) and time.time() < gone:
        time.sleep(0.5)
    assert _node_agent(job["id"], 0) is None and _node_agent(job["id"], 1) is None  # paused: no node holds anything
    checkpoints = live.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints?limit=50").json()["data"]
    assert step in [c["step_number"] for c in checkpoints]  # the pause checkpointed the step it stopped at
    assert live.api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=live.headers).status_code == 200
    final = wait_for_job(live.get, job["id"], timeout=900)
    assert final["status"] == "succeeded", (final["error"], live.log.read_text()[-4000:])
    log = [e["message"] for e in events(live, job["id"])]
    assert sum(m == f"Submitted {job['id']}: 2 nodes × 1 GPUs" for m in log) == 2
    assert f"resumed from step {step}" in log
    loss = series(live, job["id"], "loss")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1))
    assert [v for _, v in loss] == pytest.approx([v for _, v in series(live, jobs["lora"]["id"], "loss")], abs=1e-5)
