"""``workers/jobset.py``: the JobSet a multi-node job becomes.

The JobSet's own fields are validated against the ``jobset.x-k8s.io/v1alpha2`` CRD schema of JobSet
v0.12.0 (vendored in ``tests/schemas``, unknown fields refused as the API server's strict field
validation does), plus the checks its admission webhook makes (DNS-1035 names of at most 63
characters for jobs and pods). The Job and pod inside it validate against the Kubernetes 1.37 schemas
that ``kubernetes-validate`` ships. torchrun's own argument parser reads the rank command, and the
rendezvous endpoint is derived from JobSet's pod DNS naming, not from the builder's constant.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from workers.jobset import (
    COMPLETION_INDEX,
    JOBSET_API_VERSION,
    EnvSource,
    JobSetConfig,
    build_jobset,
    inherit_from_pod,
    jobset_name,
    parse_env_from,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.37.0"
JOB_ID = "ftjob-0123456789abcdef01234567"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CONFIG = JobSetConfig(namespace="alignd", image="registry.example.com/alignd-worker:0.1.0",
                      local_queue="alignd-multinode", priority_class="training",
                      node_selector=(("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),))


def strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it with strict field validation: unknown fields are errors
    wherever the schema lists properties and does not preserve unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(name: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / name).read_text())
    schema.pop("x-alignd-source")
    return strict(schema)  # type: ignore[no-any-return]


def validate_jobset(jobset: dict[str, Any]) -> None:
    """What creating it would check: the CRD schema, the webhook's name rules, the Job and pod schemas."""
    assert jobset["apiVersion"] == JOBSET_API_VERSION and jobset["kind"] == "JobSet"
    jsonschema.validate(jobset, crd_schema("jobset.x-k8s.io_v1alpha2_JobSet.json"))
    name = jobset["metadata"]["name"]
    for rjob in jobset["spec"]["replicatedJobs"]:
        spec = rjob["template"]["spec"]
        for job_index in range(rjob.get("replicas", 1)):
            job_name = f"{name}-{rjob['name']}-{job_index}"
            assert DNS_1035.match(job_name) and len(job_name) <= 63
            for pod_index in range(spec["completions"]):
                pod = f"{job_name}-{pod_index}-abcde"
                assert DNS_1035.match(pod) and len(pod) <= 63, pod
        # the Job inside, as the JobSet controller will create it, against the Kubernetes schemas
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-{rjob['name']}-0"},
               "spec": spec}
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    subdomain = jobset["spec"]["network"]["subdomain"]
    assert DNS_1035.match(subdomain) and len(subdomain) <= 63


@pytest.fixture
def jobset() -> dict[str, Any]:
    return build_jobset(JOB_ID, nodes=2, gpus_per_node=4, config=CONFIG)


def pod_spec(jobset: dict[str, Any]) -> dict[str, Any]:
    return jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_multinode_jobset_validates_against_the_v1alpha2_crd_and_kubernetes_schemas(jobset: dict[str, Any]) -> None:
    validate_jobset(jobset)
    for nodes, gpus in ((1, 1), (16, 8), (256, 8)):
        validate_jobset(build_jobset(JOB_ID, nodes=nodes, gpus_per_node=gpus, config=JobSetConfig()))


def test_multinode_the_validation_catches_a_bad_jobset(jobset: dict[str, Any]) -> None:
    """The checks above can fail: a misspelt JobSet field, a bad Job field, a pod name too long."""
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["maxRestart"] = 0
    with pytest.raises(jsonschema.ValidationError, match="maxRestart"):
        validate_jobset(bad)
    bad = copy.deepcopy(jobset)
    bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["gpus"] = 4
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_jobset(bad)
    bad = copy.deepcopy(jobset)
    bad["metadata"]["name"] = "x" * 60
    with pytest.raises(AssertionError):
        validate_jobset(bad)
    with pytest.raises(ValueError, match="63 characters"):
        build_jobset("ftjob-" + "a" * 46, nodes=2, gpus_per_node=1, config=CONFIG)
    with pytest.raises(ValueError, match="DNS-1035"):
        jobset_name("ftjob_UPPER")


def test_multinode_one_replicated_job_of_m_pods_that_fails_as_a_whole(jobset: dict[str, Any]) -> None:
    spec = jobset["spec"]
    assert spec["failurePolicy"] == {"maxRestarts": 0}  # alignd resumes from checkpoints itself
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (2, 2, "Indexed", 0)
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["network"]["enableDNSHostnames"] is True
    assert jobset["metadata"]["namespace"] == "alignd"


def test_multinode_every_pod_runs_torchrun_with_the_leaders_jobset_dns_name(
        jobset: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.run import config_from_args, get_args_parser

    (container,) = pod_spec(jobset)["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it otherwise
    config, entry, args = config_from_args(get_args_parser().parse_args(command[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 4)
    assert (config.rdzv_backend, config.max_restarts) == ("c10d", 0)
    assert args[-3:] == ["-m", "workers.launch", JOB_ID]
    # JobSet names pod P of job J of replicated job R <jobset>-<R>-<J>-<P> under the subdomain's service
    name, subdomain = jobset["metadata"]["name"], jobset["spec"]["network"]["subdomain"]
    leader = f"{name}-{jobset['spec']['replicatedJobs'][0]['name']}-0-0.{subdomain}"
    assert config.rdzv_endpoint == f"{leader}.alignd.svc.cluster.local:29500"
    assert config.run_id == name
    assert int(config.rdzv_configs["join_timeout"]) >= 600
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]
    rank_env = next(e for e in container["env"] if e["name"] == "ALIGND_NODE_RANK")
    assert COMPLETION_INDEX in rank_env["valueFrom"]["fieldRef"]["fieldPath"]


def test_multinode_kueue_labels_gpus_and_one_node_per_rank(jobset: dict[str, Any]) -> None:
    labels = jobset["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "alignd-multinode"
    assert labels["kueue.x-k8s.io/priority-class"] == "training"
    assert labels["alignd.dev/job-id"] == JOB_ID
    spec = pod_spec(jobset)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"] == container["resources"]["limits"]  # Kueue counts requests
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    pod_labels = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in term["labelSelector"]["matchLabels"].items())
    # without Kueue configured the JobSet carries no queue label and runs as soon as it is created
    plain = build_jobset(JOB_ID, nodes=2, gpus_per_node=1, config=JobSetConfig())
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


def _worker_deployment() -> dict[str, Any]:
    return yaml.safe_load((REPO / "k8s" / "base" / "worker-gpu-80g.yaml").read_text())  # type: ignore[no-any-return]


def test_multinode_pods_are_locked_down_and_read_the_workers_settings(jobset: dict[str, Any]) -> None:
    spec = pod_spec(jobset)
    worker = _worker_deployment()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (worker_container,) = worker["containers"]
    assert spec["securityContext"] == worker["securityContext"]  # UID 10001, RuntimeDefault seccomp
    assert spec["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # the same ConfigMap and Secret as the worker Deployment, and its mounts at the same paths
    assert container["envFrom"] == worker_container["envFrom"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {m["name"]: m["mountPath"] for m in worker_container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert not any(e.get("value") and "postgresql://" in e["value"] for e in container["env"])  # no secrets inline


def test_multinode_config_from_the_environment() -> None:
    config = JobSetConfig.from_env({
        "ALIGND_JOBSET_NAMESPACE": "ml", "ALIGND_JOBSET_LOCAL_QUEUE": "team-a",
        "ALIGND_JOBSET_ENV_FROM": "configmap:site-config, secret:site-secrets",
        "ALIGND_JOBSET_NODE_SELECTOR": "pool=h100,zone=a", "ALIGND_JOBSET_GRACE_SECONDS": "120",
        "ALIGND_JOBSET_MODEL_CACHE_CLAIM": "models", "ALIGND_JOBSET_CPU": "32", "ALIGND_JOBSET_MEMORY": "512Gi",
    })
    assert (config.namespace, config.local_queue, config.grace_period_s) == ("ml", "team-a", 120)
    assert config.env_from == (EnvSource("configMapRef", "site-config"), EnvSource("secretRef", "site-secrets"))
    assert config.node_selector == (("pool", "h100"), ("zone", "a"))
    built = build_jobset(JOB_ID, nodes=2, gpus_per_node=8, config=config)
    validate_jobset(built)
    spec = pod_spec(built)
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models"}} in spec["volumes"]
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["containers"][0]["resources"]["limits"] == {"cpu": "32", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert ".ml.svc.cluster.local:29500" in " ".join(spec["containers"][0]["command"])
    for bad in ({"ALIGND_JOBSET_ENV_FROM": "volume:x"}, {"ALIGND_JOBSET_GRACE_SECONDS": "soon"},
                {"ALIGND_JOBSET_NODE_SELECTOR": "pool"}):
        with pytest.raises(ValueError):
            JobSetConfig.from_env(bad)
    assert parse_env_from("") == ()


def test_multinode_rank_pods_inherit_the_supervisors_image_and_settings_refs() -> None:
    """The supervising worker's own pod, as the API serialises it (built with the kubernetes client's
    models), lends the rank pods its image, pull secrets and envFrom."""
    from kubernetes import client

    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="alignd-worker-multinode-7d9c", namespace="prod"),
        spec=client.V1PodSpec(
            image_pull_secrets=[client.V1LocalObjectReference(name="registry")],
            containers=[client.V1Container(
                name="worker", image="registry.example.com/alignd-worker:0.2.0", image_pull_policy="IfNotPresent",
                env_from=[client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name="prod-config")),
                          client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name="prod-secrets"))])]))
    serialised = client.ApiClient().sanitize_for_serialization(pod)
    config = inherit_from_pod(JobSetConfig(local_queue="q"), serialised, "worker")
    assert (config.image, config.image_pull_policy, config.namespace) == (
        "registry.example.com/alignd-worker:0.2.0", "IfNotPresent", "prod")
    assert config.env_from == (EnvSource("configMapRef", "prod-config"), EnvSource("secretRef", "prod-secrets"))
    assert config.image_pull_secrets == ("registry",) and config.local_queue == "q"
    built = build_jobset(JOB_ID, nodes=2, gpus_per_node=1, config=config)
    validate_jobset(built)
    assert pod_spec(built)["imagePullSecrets"] == [{"name": "registry"}]
    kept = inherit_from_pod(JobSetConfig(image="pinned:1"), serialised, "worker", keep_image=True)
    assert kept.image == "pinned:1"
