"""Supervising a multi-node job: submit its node group, mirror what the nodes do into job events,
stop it on cancel or pause, and restart it from the latest checkpoint when a node fails.

The worker that claims a job with ``resources.nodes`` > 1 runs :class:`JobSetSupervisor`. It does not
train; the ranks do (every node runs ``workers.launch`` under torchrun) and, as on one machine, rank 0
writes progress, checkpoints and the end state to the database and reads the cancel/pause flags.
The supervisor's part:

* **submit** the group (one at a time per job: a group left over from an earlier attempt, say by a
  worker that died, is deleted first);
* **mirror** node phases into events (``Node 2 of 4 (pod …): running``), including "waiting for
  admission" while Kueue holds the JobSet for quota;
* **cancel/pause**: rank 0 sees the flag at its next step, checkpoints (pause) and every rank exits;
  the supervisor waits for the nodes to finish, up to a timeout, then deletes the group. A group not
  yet running (queued by Kueue, pulling images) is deleted at once. A pause then leaves the job
  ``paused`` and ``resume`` queues it again, so a worker submits a fresh group that resumes from the
  checkpoint;
* **failure**: one failed node is a failed attempt: the group is deleted (JobSet's own restarts are
  off, ``maxRestarts: 0``) and submitted again, resuming from the latest checkpoint, counted in the
  job's ``restarts`` against ``ALIGND_MAX_RESTARTS`` like a lost worker; past that the job fails with
  ``node_failure``, the node's reason and the tail of its log.

Where the group runs is a :class:`Backend` (``submit / status / delete / logs``):
:class:`KubernetesBackend` submits a JobSet (``workers.jobset``) through the Kubernetes API;
``workers.local_backend.LocalBackend`` (process groups on this machine, one per node, running
``workers.jobset.rank_command`` with a localhost rendezvous) plugs into the same supervision path.
``workers.multinode`` picks one and runs the supervisor for a claimed job.

A rank that loses a peer records nothing and exits non-zero (``workers.runner.lost_peer``), so a lost
node always reaches this supervisor as a failed node; a recipe error (rank 0 fails the job) does not
restart anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.db.engine import session_scope
from service.db.repositories import JobRunRepository
from workers.jobset import (
    COMPLETION_INDEX,
    CONTAINER,
    JOBSET_GROUP,
    JOBSET_NAME_LABEL,
    JOBSET_PLURAL,
    JOBSET_VERSION,
    JobSetConfig,
    build_jobset,
    inherit_from_pod,
    jobset_name,
)
from workers.launch import ATTEMPT_ENV
from workers.reporting import Reporter

log = logging.getLogger("alignd.worker")

NodePhase = Literal["pending", "running", "succeeded", "failed", "unknown"]
GroupPhase = Literal["gone", "queued", "starting", "running", "succeeded", "failed"]


@dataclass(frozen=True)
class RankGroup:
    """What to run: ``nodes`` × ``gpus_per_node`` ranks of ``job_id``, under the name ``name``."""

    job_id: str
    name: str
    nodes: int
    gpus_per_node: int
    #: the claim's attempt: every rank's writes are fenced on it (``workers.launch.ATTEMPT_ENV``)
    attempt: int | None = None


@dataclass(frozen=True)
class NodeState:
    index: int              # node rank (the pod's completion index)
    name: str               # the pod, or the local process group
    phase: NodePhase
    reason: str = ""        # why it failed: OOMKilled, Evicted, exit code 1, ...


@dataclass(frozen=True)
class GroupStatus:
    exists: bool
    admitted: bool = True   # False while a queue (Kueue) holds the group suspended
    nodes: tuple[NodeState, ...] = ()
    completed: bool = False
    failed: bool = False
    message: str = ""


GONE = GroupStatus(exists=False)


class Backend(Protocol):
    """Where node groups run. ``status`` of a name that does not exist (any more) is :data:`GONE`;
    ``delete`` of one is a no-op, and returns before the group is gone (poll ``status``)."""

    def submit(self, group: RankGroup) -> None: ...
    def status(self, name: str) -> GroupStatus: ...
    def delete(self, name: str) -> None: ...
    def logs(self, name: str, tail_lines: int = 50) -> str: ...


def group_phase(status: GroupStatus, nodes: int) -> GroupPhase:
    """One word for the whole group: any failed node fails it; it succeeded when every node did."""
    if not status.exists:
        return "gone"
    if status.failed or any(n.phase == "failed" for n in status.nodes):
        return "failed"
    done = [n for n in status.nodes if n.phase == "succeeded"]
    if status.completed or (nodes and len(done) >= nodes):
        return "succeeded"
    if not status.admitted:
        return "queued"
    running = [n for n in status.nodes if n.phase == "running"]
    return "running" if len(running) + len(done) >= nodes and running else "starting"


@dataclass(frozen=True)
class SupervisorTimeouts:
    poll_s: float = 5.0
    pause_s: float = 900.0    # rank 0 checkpoints and uploads, then every rank exits
    cancel_s: float = 120.0   # ranks stop at their next step
    delete_s: float = 300.0   # a deleted group's pods terminate (their grace period)
    api_errors: int = 10      # consecutive failed status calls (API server restarts, network) tolerated


@dataclass
class _Attempt:
    phase: GroupPhase | None = None
    nodes: dict[int, NodeState] = field(default_factory=dict)
    started: bool = False            # a node ran: the ranks may be training and will see the flags
    stop: str | None = None
    stop_since: float | None = None


class _Retry(Exception):
    def __init__(self, message: str, data: dict[str, Any]) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class JobSetSupervisor:
    """Runs one claimed multi-node job to an end state through ``backend`` (see the module docstring)."""

    def __init__(self, backend: Backend, sessions: sessionmaker[Session], job_id: str, *, nodes: int,
                 gpus_per_node: int, max_restarts: int | None = None,
                 timeouts: SupervisorTimeouts | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, attempt: int | None = None) -> None:
        if max_restarts is None:
            from service.reconciler import ReconcilerSettings

            max_restarts = ReconcilerSettings.from_env().max_restarts
        self.backend = backend
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.group = RankGroup(job_id, jobset_name(job_id, nodes), nodes, gpus_per_node, attempt)
        self.max_restarts = max_restarts
        self.timeouts = timeouts or SupervisorTimeouts()
        self.clock = clock
        self.sleep = sleep
        self.reporter = Reporter(sessions, job_id, attempt)

    # ----------------------------------------------------------------------------- the job's life

    def run(self) -> str:
        """Returns the status the job ended in (``succeeded``, ``paused``, ``cancelled``, ``failed``)."""
        self._clear_leftover()
        while True:
            try:
                return self._attempt()
            except _Retry as failed:
                with session_scope(self.sessions) as session:
                    repo = JobRunRepository(session, self.job_id, self.attempt)
                    restarts = repo.count_restart()
                    checkpoint = repo.latest_checkpoint()
                if restarts > self.max_restarts:
                    return self._fail("node_failure", f"{failed.message}; gave up after {self.max_restarts} "
                                      "restarts", failed.data)
                step = checkpoint.step_number if checkpoint else 0
                self.reporter.event(f"{failed.message}. Restarting all {self.group.nodes} nodes from "
                                    f"{'step ' + str(step) if checkpoint else 'the start'} "
                                    f"(restart {restarts} of {self.max_restarts})", level="warn",
                                    data={**failed.data, "restart": restarts, "resume_step": step})

    def _attempt(self) -> str:
        group = self.group
        try:
            self.backend.submit(group)
        except Exception as exc:  # noqa: BLE001 - refused (webhook, RBAC, quota object): retrying will not help
            log.exception("job %s: submitting %s failed", self.job_id, group.name)
            return self._fail("launch_failed", f"could not submit {group.name}: {type(exc).__name__}: {exc}"[:800],
                              {"jobset": group.name})
        self.reporter.event(f"Submitted {group.name}: {group.nodes} nodes × {group.gpus_per_node} GPUs",
                            data={"jobset": group.name, "nodes": group.nodes, "gpus_per_node": group.gpus_per_node})
        attempt = _Attempt()
        while True:
            self.reporter.heartbeat()
            status = self._poll(group.name)
            phase = group_phase(status, group.nodes)
            self._mirror(attempt, status, phase)
            if phase == "succeeded":
                self._remove()
                return self._after_exit(attempt.stop)
            if phase in ("failed", "gone"):
                if attempt.stop is not None:  # stopping anyway: a rank that died on the way changes nothing
                    self._remove()
                    return self._after_exit(attempt.stop)
                ended = self._status()
                if ended != "running":  # rank 0 recorded the end (a recipe error fails the job, not a node)
                    self._remove()
                    return ended
                raise self._failure(status, phase)
            if attempt.stop is None:
                attempt.stop = self._stop_request()
                if attempt.stop is not None:
                    attempt.stop_since = self.clock()
                    if not attempt.started and attempt.stop != "finished":  # nothing trains: nothing to wait for
                        self.reporter.event(f"{attempt.stop.capitalize()} before the nodes started: "
                                            f"deleting {group.name}", data={"jobset": group.name})
                        self._remove()
                        return self._record_stop(attempt.stop)
                    if attempt.stop != "finished":
                        self.reporter.event(f"{attempt.stop.capitalize()} requested: waiting for the ranks to "
                                            f"{'checkpoint and ' if attempt.stop == 'pause' else ''}exit",
                                            data={"jobset": group.name})
            elif attempt.stop_since is not None:
                limit = self.timeouts.pause_s if attempt.stop == "pause" else self.timeouts.cancel_s
                if self.clock() - attempt.stop_since > limit:
                    self.reporter.event(f"The ranks did not exit within {limit:.0f} s of the {attempt.stop} "
                                        f"request: deleting {group.name}", level="warn",
                                        data={"jobset": group.name})
                    self._remove()
                    return self._record_stop(attempt.stop)
            self.sleep(self.timeouts.poll_s)

    # ---------------------------------------------------------------------------------- pieces

    def _poll(self, name: str) -> GroupStatus:
        """``backend.status``, riding out up to ``api_errors`` failures in a row (then the error is raised)."""
        for failures in range(1, self.timeouts.api_errors + 1):
            try:
                return self.backend.status(name)
            except Exception:  # noqa: BLE001
                if failures == self.timeouts.api_errors:
                    raise
                log.warning("job %s: reading %s failed (%d in a row); retrying", self.job_id, name, failures,
                            exc_info=True)
                self.sleep(self.timeouts.poll_s)
        raise AssertionError("unreachable")

    def _mirror(self, attempt: _Attempt, status: GroupStatus, phase: GroupPhase) -> None:
        total = self.group.nodes
        for node in status.nodes:
            seen = attempt.nodes.get(node.index)
            if seen is None or seen.phase != node.phase or seen.name != node.name:
                attempt.nodes[node.index] = node
                reason = f" ({node.reason})" if node.reason else ""
                self.reporter.event(f"Node {node.index + 1} of {total} ({node.name}): {node.phase}{reason}",
                                    level="error" if node.phase == "failed" else "info",
                                    data={"jobset": self.group.name, "node": node.index, "pod": node.name,
                                          "phase": node.phase, "reason": node.reason or None})
            if node.phase in ("running", "succeeded", "failed"):
                attempt.started = True
        if phase != attempt.phase:
            attempt.phase = phase
            text = {"queued": f"{self.group.name} is waiting for admission (queue quota for {total} nodes)",
                    "running": f"All {total} nodes are running"}.get(phase)
            if text:
                self.reporter.event(text, data={"jobset": self.group.name, "phase": phase})

    def _failure(self, status: GroupStatus, phase: GroupPhase) -> _Retry:
        failed = [n for n in status.nodes if n.phase == "failed"]
        if phase == "gone":
            message = f"{self.group.name} disappeared while the job ran (deleted outside alignd?)"
        elif failed:
            node = failed[0]
            message = (f"Node {node.index + 1} of {self.group.nodes} ({node.name}) failed"
                       f"{': ' + node.reason if node.reason else ''}")
        else:
            message = f"{self.group.name} failed{': ' + status.message if status.message else ''}"
        logs = self.backend.logs(self.group.name) if phase != "gone" else ""
        self._remove()
        data = {"jobset": self.group.name, "code": "node_failure",
                "nodes": [{"node": n.index, "pod": n.name, "reason": n.reason} for n in failed],
                "output": logs[-3000:]}
        self.reporter.event(message, level="error", data=data)
        return _Retry(message, data)

    def _clear_leftover(self) -> None:
        if self.backend.status(self.group.name).exists:
            self.reporter.event(f"Deleting {self.group.name}, left by an earlier attempt, before submitting",
                                level="warn", data={"jobset": self.group.name})
            self._remove()

    def _remove(self) -> None:
        """Delete the group and wait until it is gone, so the next submit cannot collide with it."""
        self.backend.delete(self.group.name)
        deadline = self.clock() + self.timeouts.delete_s
        while self.backend.status(self.group.name).exists:
            if self.clock() > deadline:
                log.warning("job %s: %s still exists %.0f s after its deletion", self.job_id, self.group.name,
                            self.timeouts.delete_s)
                return
            self.sleep(min(self.timeouts.poll_s, 2.0))

    def _stop_request(self) -> str | None:
        """``cancel``, ``pause``, ``finished`` (rank 0 already recorded an end state; the ranks are
        exiting) or None while the job should go on."""
        with session_scope(self.sessions) as session:
            job = JobRunRepository(session, self.job_id).job()
            if job.cancel_requested or job.status == "cancelled":
                return "cancel"
            if job.status != "running":
                return "finished"
            return "pause" if job.pause_requested else None

    def _status(self) -> str:
        with session_scope(self.sessions) as session:
            return JobRunRepository(session, self.job_id).job().status

    def _after_exit(self, stop: str | None) -> str:
        """Every node exited cleanly: rank 0 recorded the end state, unless the ranks stopped on a
        request before it could."""
        status = self._status()
        if status != "running":
            return status
        if stop in ("cancel", "pause"):
            return self._record_stop(stop)
        output = self.backend.logs(self.group.name)
        return self._fail("training_error", "the ranks exited without finishing the job", {"output": output[-3000:]})

    def _record_stop(self, reason: str) -> str:
        """The end state of a job whose ranks were stopped (or deleted) on request."""
        with session_scope(self.sessions) as session:
            repo = JobRunRepository(session, self.job_id, self.attempt)
            if reason == "pause":
                repo.mark_paused()
            checkpoint = repo.latest_checkpoint()
            status = repo.job().status
        if reason == "pause" and status == "paused":
            where = f"step {checkpoint.step_number}" if checkpoint else "the start (no checkpoint yet)"
            self.reporter.event(f"Job paused; resume continues from {where}",
                                data={"step": checkpoint.step_number if checkpoint else 0})
        return status

    def _fail(self, code: str, message: str, data: dict[str, Any]) -> str:
        self.reporter.event(f"Job failed: {message}", level="error", data={**data, "code": code})
        with session_scope(self.sessions) as session:
            repo = JobRunRepository(session, self.job_id, self.attempt)
            repo.finish("failed", error={"code": code, "param": None,
                                         "message": f"{message}\n{data.get('output', '')}".strip()[-1000:]})
            return repo.job().status


# ------------------------------------------------------------------------------------- Kubernetes


def _node_reason(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated and (terminated.get("exitCode") or 0) != 0:
            return f"{terminated.get('reason') or 'Error'}, exit code {terminated.get('exitCode')}"
    return str(status.get("reason") or status.get("message") or "")


_PHASES: dict[str, NodePhase] = {"Pending": "pending", "Running": "running", "Succeeded": "succeeded",
                                 "Failed": "failed"}


def group_status_from(jobset: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> GroupStatus:
    """A JobSet and its pods as the API returns them (camelCase dicts) → :class:`GroupStatus`.

    The JobSet's conditions say whether it completed, failed or is suspended (Kueue holds a JobSet
    suspended until it admits it); each node is the newest pod of its completion index."""
    conditions = {c.get("type"): c for c in (jobset.get("status") or {}).get("conditions") or []
                  if str(c.get("status")) == "True"}
    suspended = bool((jobset.get("spec") or {}).get("suspend")) or "Suspended" in conditions
    newest: dict[int, Mapping[str, Any]] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        raw = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)
        if raw is None or not str(raw).isdigit():
            continue
        index = int(raw)
        if index not in newest or str(meta.get("creationTimestamp") or "") >= str(
                (newest[index].get("metadata") or {}).get("creationTimestamp") or ""):
            newest[index] = pod
    nodes = []
    for index, pod in sorted(newest.items()):
        phase = _PHASES.get(str((pod.get("status") or {}).get("phase")), "unknown")
        reason = _node_reason(pod) if phase == "failed" else ""
        nodes.append(NodeState(index, str((pod.get("metadata") or {}).get("name")), phase, reason))
    failed = conditions.get("Failed")
    return GroupStatus(exists=True, admitted=not suspended, nodes=tuple(nodes),
                       completed="Completed" in conditions, failed=failed is not None,
                       message=str((failed or {}).get("message") or ""))


class KubernetesBackend:
    """Node groups as JobSets, through the Kubernetes API (``kubernetes`` client; in-cluster config).

    RBAC (``k8s/components/multinode/rbac.yaml``): ``jobsets`` create/get/list/watch/delete, ``pods``
    get/list/watch and ``pods/log`` get, in the worker's namespace."""

    def __init__(self, config: JobSetConfig, api_client: Any | None = None) -> None:
        from kubernetes import client

        if api_client is None:
            from kubernetes import config as kube_config

            kube_config.load_incluster_config()
            api_client = client.ApiClient()
        self.config = config
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, api_client: Any | None = None,
                         ) -> KubernetesBackend:
        """``ALIGND_JOBSET_*`` settings; the image and ``envFrom`` of this worker's own pod
        (``ALIGND_POD_NAME``/``ALIGND_POD_NAMESPACE``, from the downward API) unless set explicitly."""
        env = os.environ if environ is None else environ
        config = JobSetConfig.from_env(env)
        backend = cls(config, api_client)
        pod_name, namespace = env.get("ALIGND_POD_NAME"), env.get("ALIGND_POD_NAMESPACE")
        if pod_name and namespace:
            pod = backend.core.read_namespaced_pod(pod_name, namespace)
            backend.config = inherit_from_pod(
                config, backend.api_client.sanitize_for_serialization(pod), env.get("ALIGND_WORKER_CONTAINER"),
                keep_image=bool(env.get("ALIGND_JOBSET_IMAGE")), keep_env_from=bool(env.get("ALIGND_JOBSET_ENV_FROM")))
        return backend

    def _not_found(self, exc: Exception) -> bool:
        return getattr(exc, "status", None) == 404

    def submit(self, group: RankGroup) -> None:
        config = self.config
        if group.attempt is not None:  # the ranks' writes are fenced on the claim's attempt
            config = dataclasses.replace(config, env=(*config.env, (ATTEMPT_ENV, str(group.attempt))))
        body = build_jobset(group.job_id, nodes=group.nodes, gpus_per_node=group.gpus_per_node, config=config)
        self.custom.create_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, self.config.namespace,
                                                    JOBSET_PLURAL, body)

    def _pods(self, name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.config.namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}")
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def status(self, name: str) -> GroupStatus:
        from kubernetes.client.exceptions import ApiException

        try:
            jobset = self.custom.get_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, self.config.namespace,
                                                              JOBSET_PLURAL, name)
        except ApiException as exc:
            if self._not_found(exc):
                return GONE
            raise
        return group_status_from(jobset, self._pods(name))

    def delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:  # Foreground: the JobSet stays visible until its Jobs and pods are gone
            self.custom.delete_namespaced_custom_object(JOBSET_GROUP, JOBSET_VERSION, self.config.namespace,
                                                        JOBSET_PLURAL, name, propagation_policy="Foreground")
        except ApiException as exc:
            if not self._not_found(exc):
                raise

    def logs(self, name: str, tail_lines: int = 50) -> str:
        """The last lines of each failed pod (or of every pod when none failed), node by node."""
        from kubernetes.client.exceptions import ApiException

        pods = self._pods(name)
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        parts = []
        for pod in failed or pods:
            pod_name = pod["metadata"]["name"]
            try:
                text = self.core.read_namespaced_pod_log(pod_name, self.config.namespace, container=CONTAINER,
                                                         tail_lines=tail_lines)
            except ApiException as exc:
                text = f"(no log: {exc.reason})"
            parts.append(f"--- {pod_name} ---\n{text}")
        return "\n".join(parts)
