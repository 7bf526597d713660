"""A claimed job with ``resources.nodes`` > 1: the worker does not train it, it supervises its node group.

``tasks.run_job`` calls :func:`run_multinode` inside the job's heartbeat. The node group runs where
the worker is:

* in a Kubernetes cluster (a service-account token is mounted and ``KUBERNETES_SERVICE_HOST`` set),
  as a JobSet through the API (``workers.jobset_supervisor.KubernetesBackend``);
* anywhere else, as process groups on this machine (``workers.local_backend.LocalBackend``): the
  embedded default and the tests.

``ALIGND_MULTINODE_BACKEND`` (``kubernetes`` or ``local``) overrides the detection. Either way
:class:`~workers.jobset_supervisor.JobSetSupervisor` runs the job's life: submit, mirror, cancel/pause,
restart from the latest checkpoint when a node fails.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.db.engine import session_scope
from service.db.repositories import JobRunRepository
from service.settings import Settings
from service.state import AppState
from workers.jobset_supervisor import Backend, JobSetSupervisor, SupervisorTimeouts

log = logging.getLogger("alignd.worker")

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
BACKEND_ENV = "ALIGND_MULTINODE_BACKEND"
#: Local groups are cheap to poll (no API server): a pause or a failed node is seen within a second.
LOCAL_TIMEOUTS = SupervisorTimeouts(poll_s=1.0, delete_s=60.0)


def in_cluster(environ: Mapping[str, str] | None = None, token: Path = SERVICE_ACCOUNT_TOKEN) -> bool:
    env = os.environ if environ is None else environ
    choice = (env.get(BACKEND_ENV) or "").strip().lower()
    if choice in ("kubernetes", "local"):
        return choice == "kubernetes"
    if choice:
        raise ValueError(f"{BACKEND_ENV} must be 'kubernetes' or 'local', not {choice!r}")
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and token.is_file()


def backend_for(settings: Settings, environ: Mapping[str, str] | None = None
                ) -> tuple[Backend, SupervisorTimeouts | None]:
    """The backend for this worker's surroundings, and the supervisor timeouts that suit it."""
    if in_cluster(environ):
        from workers.jobset_supervisor import KubernetesBackend

        return KubernetesBackend.from_environment(environ), None
    from workers.local_backend import LocalBackend

    return LocalBackend(settings, environ=environ), LOCAL_TIMEOUTS


def run_multinode(state: AppState, job_id: str, resources: Mapping[str, Any], attempt: int | None = None) -> str:
    """Supervise ``job_id`` on ``resources.nodes`` × ``resources.gpus_per_node`` ranks; its end status."""
    nodes, per_node = int(resources["nodes"]), int(resources.get("gpus_per_node") or 1)
    try:
        backend, timeouts = backend_for(state.settings)
    except Exception as exc:  # noqa: BLE001 - no cluster access (RBAC, config): the job cannot run here
        log.exception("job %s: no backend for its nodes", job_id)
        message = f"could not reach a backend for {nodes} nodes: {type(exc).__name__}: {exc}"[:800]
        with session_scope(state.sessions) as session:
            repo = JobRunRepository(session, job_id, attempt)
            repo.add_event(f"Job failed: {message}", level="error", data={"code": "launch_failed"})
            repo.finish("failed", error={"code": "launch_failed", "param": "resources", "message": message})
        return "failed"
    try:
        return JobSetSupervisor(backend, state.sessions, job_id, nodes=nodes, gpus_per_node=per_node,
                                timeouts=timeouts, attempt=attempt).run()
    finally:
        close = getattr(backend, "close", None)
        if close is not None:  # the local backend: nothing may outlive its supervisor
            close()
