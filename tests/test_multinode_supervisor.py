"""``workers/jobset_supervisor.py``: how a multi-node job's life maps onto its node group.

The supervisor runs against :class:`FakeCluster`, an in-process implementation of its ``Backend``
protocol. It is a test double for the Kubernetes API and the JobSet/Kueue controllers, which cannot run
here: each submitted group plays a script (held by Kueue, pods pending, running) and its rank 0 does
what ``workers.launch``'s rank 0 does, against the real database: it records progress and
checkpoints, reads the cancel and pause flags, and records the end state. Everything else is real:
SQLite, the API that pauses and cancels, the job rows and events.

``KubernetesBackend``'s parsing of what the API returns is checked on objects built with the
``kubernetes`` client's own models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import pytest

from service.db.engine import session_scope
from service.db.repositories import JobRunRepository
from tests.conftest import PREFERENCE_ROWS, Api, jsonl
from workers.jobset_supervisor import (
    GONE,
    GroupStatus,
    JobSetSupervisor,
    NodeState,
    RankGroup,
    SupervisorTimeouts,
    group_phase,
    group_status_from,
)

NODES = 2


@dataclass
class Script:
    """What one submitted group does, one tick per ``status`` call."""

    queued: int = 0               # ticks Kueue holds it suspended
    pending: int = 1              # ticks its pods are scheduled / pulling the image
    steps: int = 3                # ticks of training (one step each); then rank 0 records succeeded
    fail_node: int | None = None  # this node's pod fails at training tick ``fail_at``
    fail_at: int = 1
    obeys_flags: bool = True      # rank 0 reads cancel/pause (False: stuck in a long step)
    recipe_error_at: int | None = None  # rank 0 fails the job at this step (exit 0), the others exit 1


@dataclass
class Group:
    group: RankGroup
    script: Script
    tick: int = 0
    step: int = 0
    phases: list[str] = field(default_factory=list)
    admitted: bool = False
    checkpointing: bool = False
    deleting: int | None = None   # ticks until gone after delete
    phases_at_delete: list[str] | None = None


class FakeCluster:
    """Backend protocol, in memory (see the module docstring)."""

    def __init__(self, sessions: Any, scripts: list[Script], delete_ticks: int = 1) -> None:
        self.sessions = sessions
        self.scripts = list(scripts)
        self.delete_ticks = delete_ticks
        self.groups: dict[str, Group] = {}
        self.submitted: list[str] = []
        self.deleted: list[tuple[str, list[str]]] = []
        self.ops: list[tuple[str, str]] = []

    # rank 0 of the group, against the real database
    def _rank0(self, g: Group) -> None:
        with session_scope(self.sessions) as session:
            repo = JobRunRepository(session, g.group.job_id)
            job = repo.job()
            if g.script.obeys_flags and (job.cancel_requested or job.status != "running"):
                g.phases = ["succeeded"] * NODES
                return
            if g.script.obeys_flags and job.pause_requested:
                if not g.checkpointing:  # this tick saves the checkpoint, the next one exits
                    g.checkpointing = True
                    return
                repo.add_checkpoint(g.step, {}, f"jobs/{job.id}/step_{g.step}")
                repo.mark_paused()
                g.phases = ["succeeded"] * NODES
                return
            g.step += 1
            if g.step == g.script.recipe_error_at:  # what workers.launch does on a recipe error
                repo.finish("failed", error={"code": "nan_loss", "param": None, "message": "loss became nan"})
                g.phases = ["succeeded"] + ["failed"] * (NODES - 1)
                return
            repo.progress(step=g.step, total_steps=g.script.steps)
            if g.step % 2 == 0:
                repo.add_checkpoint(g.step, {}, f"jobs/{job.id}/step_{g.step}")
            if g.step >= g.script.steps:
                repo.finish("succeeded")
                g.phases = ["succeeded"] * NODES

    def _advance(self, g: Group) -> None:
        g.tick += 1
        s = g.script
        if g.tick <= s.queued:
            return
        g.admitted = True
        if g.tick <= s.queued + s.pending:
            g.phases = ["pending"] * g.group.nodes
            return
        if all(p == "running" for p in g.phases) or all(p == "pending" for p in g.phases):
            g.phases = ["running"] * g.group.nodes
            training_tick = g.tick - s.queued - s.pending
            if s.fail_node is not None and training_tick >= s.fail_at:
                g.phases[s.fail_node] = "failed"
                return
            self._rank0(g)

    def submit(self, group: RankGroup) -> None:
        assert group.name not in self.groups, "submitted over a group that still exists"
        self.submitted.append(group.name)
        self.ops.append(("submit", group.name))
        self.groups[group.name] = Group(group, self.scripts.pop(0))

    def status(self, name: str) -> GroupStatus:
        g = self.groups.get(name)
        if g is None:
            return GONE
        if g.deleting is not None:
            g.deleting -= 1
            if g.deleting < 0:
                del self.groups[name]
                return GONE
        else:
            self._advance(g)
        nodes = tuple(NodeState(i, f"{name}-node-0-{i}-x{i}", phase,  # type: ignore[arg-type]
                                "OOMKilled, exit code 137" if phase == "failed" else "")
                      for i, phase in enumerate(g.phases))
        return GroupStatus(exists=True, admitted=g.admitted, nodes=nodes)

    def delete(self, name: str) -> None:
        g = self.groups.get(name)
        if g is not None and g.deleting is None:
            g.deleting = self.delete_ticks
            g.phases_at_delete = list(g.phases)
            self.deleted.append((name, list(g.phases)))
            self.ops.append(("delete", name))

    def logs(self, name: str, tail_lines: int = 50) -> str:
        return f"--- {name}-node-0-1 ---\ntorch.OutOfMemoryError: CUDA out of memory" if name in self.groups else ""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


@pytest.fixture
def running_job(sqlite_api: Api) -> Iterator[tuple[Api, dict[str, str], str]]:
    """A claimed (``running``) multi-node job created through the API."""
    headers = sqlite_api.key("acme")
    f = sqlite_api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                               data={"purpose": "fine-tune"}).json()
    r = sqlite_api.client.post("/v1/fine_tuning/jobs", headers=headers, json={
        "model": "tiny-random-llama", "training_file": f["id"], "method": {"type": "dpo"},
        "resources": {"nodes": NODES, "gpus_per_node": 1}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["resources"]["nodes"] == NODES
    with session_scope(sqlite_api.state.sessions) as session:
        assert JobRunRepository(session, job["id"]).claim("alignd-supervisor@test")
    yield sqlite_api, headers, job["id"]


def supervisor(api: Api, job_id: str, cluster: FakeCluster, clock: Clock, **kw: Any) -> JobSetSupervisor:
    timeouts = SupervisorTimeouts(poll_s=1.0, pause_s=30.0, cancel_s=10.0, delete_s=20.0)
    return JobSetSupervisor(cluster, api.state.sessions, job_id, nodes=NODES, gpus_per_node=1,
                            max_restarts=kw.pop("max_restarts", 3), timeouts=timeouts, clock=clock,
                            sleep=clock.sleep, **kw)


def events(api: Api, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    return api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100&order=asc",  # type: ignore[no-any-return]
                          headers=headers).json()["data"]


def job(api: Api, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    return api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()  # type: ignore[no-any-return]


def messages(api: Api, headers: dict[str, str], job_id: str) -> list[str]:
    return [e["message"] for e in events(api, headers, job_id)]


def test_multinode_supervisor_mirrors_node_phases_and_deletes_the_finished_group(running_job: Any) -> None:
    api, headers, job_id = running_job
    cluster, clock = FakeCluster(api.state.sessions, [Script(queued=2, pending=1, steps=3)]), Clock()
    assert supervisor(api, job_id, cluster, clock).run() == "succeeded"
    name = job_id
    assert cluster.submitted == [name]
    assert cluster.deleted == [(name, ["succeeded", "succeeded"])] and name not in cluster.groups
    seen = messages(api, headers, job_id)
    expected = [f"Submitted {name}: 2 nodes × 1 GPUs",
                f"{name} is waiting for admission (queue quota for 2 nodes)",
                f"Node 1 of 2 ({name}-node-0-0-x0): pending", f"Node 2 of 2 ({name}-node-0-1-x1): pending",
                f"Node 1 of 2 ({name}-node-0-0-x0): running", f"Node 2 of 2 ({name}-node-0-1-x1): running",
                "All 2 nodes are running",
                f"Node 1 of 2 ({name}-node-0-0-x0): succeeded", f"Node 2 of 2 ({name}-node-0-1-x1): succeeded"]
    assert [m for m in seen if m in expected] == expected
    pod_event = next(e for e in events(api, headers, job_id) if e["message"].endswith("-x1): running"))
    assert pod_event["data"] == {"jobset": name, "node": 1, "pod": f"{name}-node-0-1-x1", "phase": "running",
                                 "reason": None}
    assert job(api, headers, job_id)["status"] == "succeeded"


def test_multinode_pause_waits_for_the_checkpoint_then_deletes_and_resume_resubmits(running_job: Any) -> None:
    api, headers, job_id = running_job
    cluster, clock = FakeCluster(api.state.sessions, [Script(pending=1, steps=1000), Script(steps=3)]), Clock()
    sup = supervisor(api, job_id, cluster, clock)

    original = cluster._rank0
    calls = {"n": 0}

    def rank0_with_pause(g: Group) -> None:  # the user pauses after three training steps
        calls["n"] += 1
        if calls["n"] == 4:
            assert api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=headers).status_code == 200
        original(g)

    cluster._rank0 = rank0_with_pause  # type: ignore[method-assign]
    assert sup.run() == "paused"
    # deleted only after every node had exited: rank 0 checkpointed at step 3 first
    assert cluster.deleted == [(job_id, ["succeeded", "succeeded"])]
    paused = job(api, headers, job_id)
    assert paused["status"] == "paused" and paused["progress"]["step"] == 3
    assert "Pause requested: waiting for the ranks to checkpoint and exit" in messages(api, headers, job_id)
    with session_scope(api.state.sessions) as session:
        assert JobRunRepository(session, job_id).latest_checkpoint().step_number == 3  # type: ignore[union-attr]
    # resume: queued again; the worker that claims it submits a fresh group
    assert api.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=headers).status_code == 200
    with session_scope(api.state.sessions) as session:
        assert JobRunRepository(session, job_id).claim("alignd-supervisor@test")
    cluster._rank0 = original  # type: ignore[method-assign]
    assert supervisor(api, job_id, cluster, clock).run() == "succeeded"
    assert cluster.submitted == [job_id, job_id]


def test_multinode_ranks_that_ignore_a_pause_are_deleted_after_the_timeout(running_job: Any) -> None:
    api, headers, job_id = running_job
    cluster, clock = FakeCluster(api.state.sessions, [Script(steps=1000, obeys_flags=False)]), Clock()
    sup = supervisor(api, job_id, cluster, clock)
    calls = {"n": 0}
    original = cluster._rank0

    def pause_then_train(g: Group) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            assert api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=headers).status_code == 200
        original(g)

    cluster._rank0 = pause_then_train  # type: ignore[method-assign]
    started = clock.now
    assert sup.run() == "paused"
    (name, phases), = cluster.deleted
    assert phases == ["running", "running"]  # deleted while they still ran
    assert clock.now - started > 30.0  # not before the pause timeout
    seen = messages(api, headers, job_id)
    assert any(m.startswith("The ranks did not exit within 30 s of the pause request") for m in seen)
    with session_scope(api.state.sessions) as session:
        latest = JobRunRepository(session, job_id).latest_checkpoint()
    assert latest is not None and f"Job paused; resume continues from step {latest.step_number}" in seen
    assert job(api, headers, job_id)["status"] == "paused"


def test_multinode_cancel_while_kueue_holds_the_group_deletes_it_at_once(running_job: Any) -> None:
    api, headers, job_id = running_job
    cluster, clock = FakeCluster(api.state.sessions, [Script(queued=10_000)]), Clock()
    sup = supervisor(api, job_id, cluster, clock)
    original = cluster._advance

    def cancel_on_third_tick(g: Group) -> None:
        if g.tick == 2:
            assert api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers).status_code == 200
        original(g)

    cluster._advance = cancel_on_third_tick  # type: ignore[method-assign]
    assert sup.run() == "cancelled"
    assert cluster.deleted == [(job_id, [])]  # no pod ever existed
    assert clock.now < 10.0  # no waiting for ranks that never started
    assert f"Cancel before the nodes started: deleting {job_id}" in messages(api, headers, job_id)


def test_multinode_a_failed_node_restarts_the_group_from_the_latest_checkpoint(running_job: Any) -> None:
    api, headers, job_id = running_job
    scripts = [Script(steps=10, fail_node=1, fail_at=5), Script(steps=3)]
    cluster, clock = FakeCluster(api.state.sessions, scripts), Clock()
    assert supervisor(api, job_id, cluster, clock).run() == "succeeded"
    assert cluster.submitted == [job_id, job_id]
    assert cluster.deleted[0] == (job_id, ["running", "failed"])
    all_events = events(api, headers, job_id)
    failure = next(e for e in all_events if e["message"] == f"Node 2 of 2 ({job_id}-node-0-1-x1) failed: "
                                                          "OOMKilled, exit code 137")
    assert failure["level"] == "error" and "CUDA out of memory" in failure["data"]["output"]
    assert failure["data"]["nodes"] == [{"node": 1, "pod": f"{job_id}-node-0-1-x1",
                                         "reason": "OOMKilled, exit code 137"}]
    restart = next(e for e in all_events if "Restarting all 2 nodes" in e["message"])
    # four steps ran before the failure; the checkpoint of step 4 is where the next attempt resumes
    assert restart["message"].endswith("Restarting all 2 nodes from step 4 (restart 1 of 3)")
    assert restart["level"] == "warn" and restart["data"]["resume_step"] == 4
    with session_scope(api.state.sessions) as session:
        assert JobRunRepository(session, job_id).job().restarts == 1


def test_multinode_a_recipe_error_recorded_by_rank_0_ends_the_job_without_a_restart(running_job: Any) -> None:
    """The other ranks exit non-zero after rank 0 failed the job: a failed node, but nothing to retry."""
    api, headers, job_id = running_job
    cluster, clock = FakeCluster(api.state.sessions, [Script(steps=10, recipe_error_at=3), Script()]), Clock()
    assert supervisor(api, job_id, cluster, clock).run() == "failed"
    assert cluster.submitted == [job_id] and cluster.groups == {}
    failed = job(api, headers, job_id)
    assert failed["status"] == "failed" and failed["error"]["code"] == "nan_loss"
    assert not any("Restarting" in m for m in messages(api, headers, job_id))
    with session_scope(api.state.sessions) as session:
        assert JobRunRepository(session, job_id).job().restarts == 0


def test_multinode_repeated_node_failures_fail_the_job_after_max_restarts(running_job: Any) -> None:
    api, headers, job_id = running_job
    scripts = [Script(steps=10, fail_node=0, fail_at=1) for _ in range(3)]
    cluster, clock = FakeCluster(api.state.sessions, scripts), Clock()
    assert supervisor(api, job_id, cluster, clock, max_restarts=1).run() == "failed"
    assert cluster.submitted == [job_id, job_id]  # the first attempt and one restart
    failed = job(api, headers, job_id)
    assert failed["status"] == "failed" and failed["error"]["code"] == "node_failure"
    assert f"Node 1 of 2 ({job_id}-node-0-0-x0) failed: OOMKilled, exit code 137; gave up after 1 restarts" \
        in failed["error"]["message"]


def test_multinode_a_leftover_group_is_deleted_before_submitting_and_a_vanished_one_is_a_failure(
        running_job: Any) -> None:
    api, headers, job_id = running_job
    cluster, clock = FakeCluster(api.state.sessions, [Script(steps=50), Script(steps=2)], delete_ticks=2), Clock()
    # a worker died and left its JobSet (whose rank 0 no longer reaches this job) running
    leftover = Group(RankGroup(job_id, job_id, NODES, 1), Script(queued=10**6))
    cluster.groups[job_id] = leftover
    sup = supervisor(api, job_id, cluster, clock)
    original = cluster._rank0

    def vanish_after_two_steps(g: Group) -> None:
        original(g)
        if g.step == 2 and len(cluster.submitted) == 1:
            del cluster.groups[g.group.name]  # deleted by someone else (kubectl delete jobset)

    cluster._rank0 = vanish_after_two_steps  # type: ignore[method-assign]
    assert sup.run() == "succeeded"
    seen = messages(api, headers, job_id)
    assert seen.index(f"Deleting {job_id}, left by an earlier attempt, before submitting") < seen.index(
        f"Submitted {job_id}: 2 nodes × 1 GPUs")
    assert cluster.ops[:2] == [("delete", job_id), ("submit", job_id)] and leftover.deleting is not None
    assert len(cluster.submitted) == 2
    assert any(m.startswith(f"{job_id} disappeared while the job ran") for m in seen)


def test_multinode_group_phase_words() -> None:
    def status(*phases: str, **kw: Any) -> GroupStatus:
        return GroupStatus(exists=True, nodes=tuple(NodeState(i, f"p{i}", p) for i, p in enumerate(phases)),  # type: ignore[arg-type]
                           **kw)

    assert group_phase(GONE, 2) == "gone"
    assert group_phase(status(admitted=False), 2) == "queued"
    assert group_phase(status("pending", "running"), 2) == "starting"
    assert group_phase(status("running"), 2) == "starting"  # the second pod does not exist yet
    assert group_phase(status("running", "running"), 2) == "running"
    assert group_phase(status("succeeded", "running"), 2) == "running"
    assert group_phase(status("succeeded", "succeeded"), 2) == "succeeded"
    assert group_phase(status("running", "failed"), 2) == "failed"
    assert group_phase(status(failed=True), 2) == "failed"


def test_multinode_kubernetes_objects_map_to_group_status() -> None:
    """A JobSet (as the custom-objects API returns it) and its pods (``kubernetes`` client models,
    serialised as the backend serialises them) → node phases and reasons."""
    from datetime import datetime, timedelta

    from kubernetes import client

    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def pod(index: int, phase: str, created: datetime, terminated: tuple[str, int] | None = None,
            reason: str | None = None) -> dict[str, Any]:
        statuses = None
        if terminated:
            statuses = [client.V1ContainerStatus(
                name="rank", image="alignd-worker", image_id="sha256:1", ready=False, restart_count=0,
                state=client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
                    reason=terminated[0], exit_code=terminated[1])))]
        obj = client.V1Pod(
            metadata=client.V1ObjectMeta(name=f"js-node-0-{index}-{created.second:05d}", creation_timestamp=created,
                                         annotations={"batch.kubernetes.io/job-completion-index": str(index)},
                                         labels={"jobset.sigs.k8s.io/jobset-name": "js"}),
            status=client.V1PodStatus(phase=phase, reason=reason, container_statuses=statuses))
        return client.ApiClient().sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    suspended = {"spec": {"suspend": True}, "status": {"conditions": [
        {"type": "Suspended", "status": "True", "reason": "SuspendedJobs", "message": "jobset is suspended"}]}}
    assert group_status_from(suspended, []).admitted is False
    running = {"spec": {}, "status": {"conditions": [{"type": "Suspended", "status": "False"}]}}
    pods = [pod(0, "Running", t0), pod(1, "Pending", t0)]
    status = group_status_from(running, pods)
    assert status.admitted and [(n.index, n.phase) for n in status.nodes] == [(0, "running"), (1, "pending")]
    failed_js = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                            "message": "jobset failed due to reaching max number of restarts"}]}}
    pods = [pod(0, "Running", t0), pod(1, "Failed", t0, terminated=("OOMKilled", 137)),
            pod(1, "Pending", t0 + timedelta(seconds=5))]  # a newer pod of index 1 wins
    status = group_status_from(failed_js, pods)
    assert status.failed and "max number of restarts" in status.message
    assert status.nodes[1].phase == "pending" and status.nodes[1].name == "js-node-0-1-00005"
    evicted = group_status_from(running, [pod(0, "Failed", t0, reason="Evicted"),
                                          pod(1, "Failed", t0, terminated=("Error", 1))])
    assert [n.reason for n in evicted.nodes] == ["Evicted", "Error, exit code 1"]
    assert group_phase(evicted, 2) == "failed"
    done = {"status": {"conditions": [{"type": "Completed", "status": "True"}]}}
    assert group_phase(group_status_from(done, [pod(0, "Succeeded", t0)]), 2) == "succeeded"


def test_multinode_api_errors_are_ridden_out_and_a_refused_submit_fails_the_job(running_job: Any) -> None:
    api, headers, job_id = running_job

    class Flaky(FakeCluster):
        """The API server answers two status calls with errors (a restart, say), then works."""

        errors = 2

        def status(self, name: str) -> GroupStatus:
            if self.submitted and self.errors:
                self.errors -= 1
                raise ConnectionResetError("the API server went away")
            return super().status(name)

    cluster, clock = Flaky(api.state.sessions, [Script(steps=2)]), Clock()
    assert supervisor(api, job_id, cluster, clock).run() == "succeeded" and cluster.errors == 0

    class Refusing(FakeCluster):
        def submit(self, group: RankGroup) -> None:
            raise PermissionError('jobsets.jobset.x-k8s.io is forbidden: cannot create resource "jobsets"')

    headers2 = api.key("other")
    f = api.client.post("/v1/files", headers=headers2, files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))},
                        data={"purpose": "fine-tune"}).json()
    second = api.client.post("/v1/fine_tuning/jobs", headers=headers2, json={
        "model": "tiny-random-llama", "training_file": f["id"], "method": {"type": "dpo"},
        "resources": {"nodes": NODES, "gpus_per_node": 1}}).json()["id"]
    with session_scope(api.state.sessions) as session:
        assert JobRunRepository(session, second).claim("alignd-supervisor@test")
    refused = supervisor(api, second, Refusing(api.state.sessions, []), Clock()).run()
    assert refused == "failed"
    error = job(api, headers2, second)["error"]
    assert error["code"] == "launch_failed" and "forbidden" in error["message"]
