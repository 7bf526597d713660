"""``KubernetesBackend`` through the real ``kubernetes`` client, against a stand-in API server.

No Kubernetes API can run here, so a small HTTP server on localhost plays one (a test double): it
serves the worker's own pod, stores the JobSets it is sent and lists their pods, and records every
request. That checks what the unit tests of the supervisor cannot: the URLs, verbs and bodies the
client really sends, that the JobSet created is the builder's (with the worker pod's image and
envFrom), and that every request is one the Role in ``k8s/components/multinode/rbac.yaml`` allows.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.test_k8s_manifests import K8S
from workers.jobset import JobSetConfig, build_jobset
from workers.jobset_supervisor import KubernetesBackend, RankGroup, group_phase

NAMESPACE = "alignd"
SELF = "alignd-worker-multinode-7d9c"
JOB_ID = "ftjob-0123456789abcdef01234567"
JOBSETS = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NAMESPACE}/jobsets"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


class FakeApi:
    def __init__(self, worker_pod: dict[str, Any]) -> None:
        self.worker_pod = worker_pod
        self.jobsets: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []

    def pods_of(self, name: str) -> list[dict[str, Any]]:
        if name not in self.jobsets:
            return []
        return [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": f"{name}-node-0-{i}-abcde", "namespace": NAMESPACE,
                              "creationTimestamp": "2026-01-01T00:00:00Z",
                              "labels": {"jobset.sigs.k8s.io/jobset-name": name},
                              "annotations": {"batch.kubernetes.io/job-completion-index": str(i)}},
                 "spec": {"containers": [{"name": "rank", "image": "x"}]},
                 "status": {"phase": phase, "containerStatuses": [
                     {"name": "rank", "image": "x", "imageID": "sha256:1", "ready": False, "restartCount": 0,
                      "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}} if phase == "Failed"
                      else {"running": {}}}]}}
                for i, phase in enumerate(("Running", "Failed"))]

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        self.requests.append((method, path, query, body))
        if method == "GET" and path == f"{PODS}/{SELF}":
            return 200, self.worker_pod
        if method == "GET" and path == PODS:
            selector = query["labelSelector"][0]
            name = selector.split("=", 1)[1]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": self.pods_of(name)}
        if method == "GET" and path.startswith(PODS + "/") and path.endswith("/log"):
            return 200, "step 7: loss 1.23\ntorch.OutOfMemoryError: CUDA out of memory\n"
        if method == "POST" and path == JOBSETS:
            self.jobsets[body["metadata"]["name"]] = body
            return 201, body
        if path.startswith(JOBSETS + "/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.jobsets:
                return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "code": 404, "message": f'jobsets.jobset.x-k8s.io "{name}" not found'}
            if method == "GET":
                return 200, {**self.jobsets[name], "status": {"conditions": [
                    {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "a job failed"}]}}
            if method == "DELETE":
                del self.jobsets[name]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}
        return 404, {"kind": "Status", "code": 404, "message": f"no route {method} {path}"}


def _worker_pod() -> dict[str, Any]:
    deployment = yaml.safe_load((K8S / "components" / "multinode" / "worker-multinode.yaml").read_text())
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": SELF, "namespace": NAMESPACE},
            "spec": deployment["spec"]["template"]["spec"]}


@pytest.fixture
def api() -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi(_worker_pod())

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _rbac_allows() -> set[tuple[str, str, str]]:
    role = next(d for d in yaml.safe_load_all((K8S / "components" / "multinode" / "rbac.yaml").read_text())
                if d["kind"] == "Role")
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def _as_rbac(method: str, path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    assert rest[0] == "namespaces" and rest[1] == NAMESPACE, path  # never outside its namespace
    resource, named = rest[2], len(rest) > 3
    if len(rest) > 4:
        resource += "/" + rest[4]
    verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if named else "list")
    return group, resource, verb


def test_multinode_kubernetes_backend_requests_are_the_builders_jobset_and_within_rbac(
        api: tuple[FakeApi, str]) -> None:
    from kubernetes import client

    fake, host = api
    api_client = client.ApiClient(client.Configuration(host=host))
    env = {"ALIGND_POD_NAME": SELF, "ALIGND_POD_NAMESPACE": NAMESPACE, "ALIGND_WORKER_CONTAINER": "worker",
           "ALIGND_JOBSET_NAMESPACE": NAMESPACE, "ALIGND_JOBSET_LOCAL_QUEUE": "alignd-multinode"}
    backend = KubernetesBackend.from_environment(env, api_client=api_client)
    worker = fake.worker_pod["spec"]["containers"][0]
    assert backend.config.image == worker["image"]  # taken from its own pod, as kustomize rewrote it

    group = RankGroup(JOB_ID, JOB_ID, 2, 8)
    assert backend.status(JOB_ID).exists is False  # 404 is "gone", not an error
    backend.submit(group)
    created = fake.jobsets[JOB_ID]
    expected = build_jobset(JOB_ID, nodes=2, gpus_per_node=8, config=backend.config)
    assert created == expected
    rank = created["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert rank["image"] == worker["image"] and rank["envFrom"] == worker["envFrom"]

    status = backend.status(JOB_ID)
    assert status.failed and group_phase(status, 2) == "failed"
    assert [(n.phase, n.reason) for n in status.nodes] == [("running", ""), ("failed", "OOMKilled, exit code 137")]
    logs = backend.logs(JOB_ID)
    assert logs.startswith(f"--- {JOB_ID}-node-0-1-abcde ---") and "CUDA out of memory" in logs
    backend.delete(JOB_ID)
    backend.delete(JOB_ID)  # already gone: a no-op
    assert JOB_ID not in fake.jobsets

    deletes = [(query, body) for method, _, query, body in fake.requests if method == "DELETE"]
    query, body = deletes[0]
    assert query.get("propagationPolicy") == ["Foreground"] or (body or {}).get("propagationPolicy") == "Foreground"
    log_query = next(q for m, p, q, _ in fake.requests if p.endswith("/log"))
    assert log_query["container"] == ["rank"] and log_query["tailLines"] == ["50"]
    list_query = next(q for m, p, q, _ in fake.requests if p == PODS)
    assert list_query["labelSelector"] == [f"jobset.sigs.k8s.io/jobset-name={JOB_ID}"]
    used = {_as_rbac(method, path) for method, path, _, _ in fake.requests}
    assert {("jobset.x-k8s.io", "jobsets", v) for v in ("create", "get", "delete")} | {
        ("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get")} == used
    assert used <= _rbac_allows()


def test_multinode_explicit_settings_win_over_the_workers_pod(api: tuple[FakeApi, str]) -> None:
    from kubernetes import client

    fake, host = api
    env = {"ALIGND_POD_NAME": SELF, "ALIGND_POD_NAMESPACE": NAMESPACE, "ALIGND_JOBSET_NAMESPACE": NAMESPACE,
           "ALIGND_JOBSET_IMAGE": "registry.example.com/alignd-worker:pinned",
           "ALIGND_JOBSET_ENV_FROM": "configmap:ranks-config"}
    backend = KubernetesBackend.from_environment(env, api_client=client.ApiClient(client.Configuration(host=host)))
    assert backend.config.image == "registry.example.com/alignd-worker:pinned"
    assert [s.name for s in backend.config.env_from] == ["ranks-config"]
    assert JobSetConfig.from_env(env).image == backend.config.image
