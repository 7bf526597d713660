"""A multi-node job as a JobSet (``jobset.x-k8s.io/v1alpha2``): a pure builder, no cluster access.

A job with ``resources.nodes`` = M and ``gpus_per_node`` = G becomes one JobSet with one replicated
Job (``node``) of M pods, ``parallelism = completions = M`` in Indexed completion mode. Every pod runs
the job's recipe under torchrun::

    python -m torch.distributed.run --nnodes M --nproc-per-node G --rdzv-backend c10d \\
        --rdzv-endpoint <leader>:29500 --rdzv-id <jobset> --max-restarts 0 -m workers.launch <job_id>

(``python -m torch.distributed.run`` is torchrun; the module form runs under the image's own Python,
where alignd is installed.) Why each field is what it is:

* **Rendezvous.** JobSet gives every pod a DNS name ``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>``
  under the headless service ``<subdomain>`` (``network.enableDNSHostnames``); the leader is pod 0 of
  job 0. The endpoint is its fully qualified name ``….<subdomain>.<namespace>.svc.<cluster domain>``:
  the kubelet writes exactly that name into pod 0's ``/etc/hosts``, so torch's c10d backend recognises
  itself as the store's host without waiting for DNS, and the other pods retry their connection for
  ``rdzv_timeout_s`` while the leader starts. ``publishNotReadyAddresses`` lets them resolve it
  before it is Ready (there is no readiness probe for a rendezvous port).
* **Failure.** ``failurePolicy.maxRestarts: 0``, ``backoffLimit: 0`` and ``restartPolicy: Never``: one
  failed pod fails the whole JobSet at once. alignd restarts it itself (``workers.jobset_supervisor``),
  from the latest checkpoint, counting the restart like any other; a JobSet restart would instead
  replay from the same point without alignd knowing.
* **Gang admission.** ``kueue.x-k8s.io/queue-name`` (and ``kueue.x-k8s.io/priority-class``) on the
  JobSet: Kueue suspends it on creation and admits all M pods together when the LocalQueue's
  ClusterQueue has quota for M×G GPUs, so half a job never holds GPUs waiting for the other half.
* **One pod per node.** Each pod asks for G ``nvidia.com/gpu`` and a required pod anti-affinity on
  ``kubernetes.io/hostname`` keeps two ranks of the same job off one node (M nodes means M machines).
* **Same settings as the worker.** The pods read ``ALIGND_*`` from the same ConfigMap and Secret
  (``envFrom``) as the worker Deployment, so ``Settings.from_env()`` in a rank equals the
  supervisor's; secrets are referenced, never copied into the JobSet object.
* **Locked down** like every alignd pod: non-root (UID 10001), no privilege escalation, all
  capabilities dropped, read-only root filesystem, ``RuntimeDefault`` seccomp, no API token.

Pod names must stay DNS-1035 labels of at most 63 characters (the JobSet webhook refuses longer
ones): :func:`jobset_name` checks that for the largest pod index.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"      # set by the JobSet controller on its pods
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # set by the Job controller (Indexed)
JOB_ID_LABEL = "alignd.dev/job-id"
#: Set on every rank of a multi-node job (the pod's completion index, or the local node group's
#: number): a rank that loses a peer leaves the restart to the supervisor (``workers.runner.lost_peer``).
NODE_RANK_ENV = "ALIGND_NODE_RANK"
GROUP_LABEL = "alignd.dev/jobset"
REPLICATED_JOB = "node"
CONTAINER = "rank"
RDZV_PORT = 29500
GPU = "nvidia.com/gpu"
# Where the worker Deployments mount their data dir and model cache (k8s/base/config.yaml names them).
DATA_DIR, MODEL_CACHE_DIR = "/var/lib/alignd", "/var/cache/alignd/models"
_POD_SUFFIX = len("-abcde")  # the Job controller's random suffix on pod names
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class EnvSource:
    """One ``envFrom`` entry: ``configMapRef`` or ``secretRef`` by name."""

    kind: Literal["configMapRef", "secretRef"]
    name: str


DEFAULT_ENV_FROM = (EnvSource("configMapRef", "alignd-config"), EnvSource("secretRef", "alignd-secrets"))


@dataclass(frozen=True)
class JobSetConfig:
    """Site settings for the JobSets a multi-node worker submits (``ALIGND_JOBSET_*``, :meth:`from_env`).

    ``image`` and ``env_from`` default to the supervising worker's own pod (``KubernetesBackend``
    reads them from the API), so an overlay's ``images:`` rewrite reaches the rank pods too."""

    namespace: str = "default"
    image: str = "alignd-worker:0.1.0"
    image_pull_policy: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    local_queue: str | None = None           # Kueue LocalQueue; None: no Kueue, the JobSet runs at once
    priority_class: str | None = None        # Kueue WorkloadPriorityClass
    service_account: str = "alignd"
    env_from: tuple[EnvSource, ...] = DEFAULT_ENV_FROM
    env: tuple[tuple[str, str], ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    model_cache_claim: str | None = None     # a ReadWriteMany PVC shared by the ranks; else emptyDir
    model_cache_size: str = "200Gi"
    cluster_domain: str = "cluster.local"
    rdzv_port: int = RDZV_PORT
    rdzv_timeout_s: int = 900
    grace_period_s: int = 300
    ttl_seconds_after_finished: int = 3600
    run_as_user: int = 10001
    labels: tuple[tuple[str, str], ...] = field(default=(("app.kubernetes.io/part-of", "alignd"),))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobSetConfig:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value and value.strip() else None

        def pairs(name: str) -> tuple[tuple[str, str], ...]:
            raw = get(name) or ""
            out = []
            for item in filter(None, (p.strip() for p in raw.split(","))):
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"{name} entry {item!r} is not key=value")
                out.append((key.strip(), value.strip()))
            return tuple(out)

        config = cls()
        updates: dict[str, Any] = {}
        for attr, name in (("namespace", "ALIGND_JOBSET_NAMESPACE"), ("image", "ALIGND_JOBSET_IMAGE"),
                           ("local_queue", "ALIGND_JOBSET_LOCAL_QUEUE"),
                           ("priority_class", "ALIGND_JOBSET_PRIORITY_CLASS"),
                           ("service_account", "ALIGND_JOBSET_SERVICE_ACCOUNT"),
                           ("cpu", "ALIGND_JOBSET_CPU"), ("memory", "ALIGND_JOBSET_MEMORY"),
                           ("shm_size", "ALIGND_JOBSET_SHM_SIZE"),
                           ("model_cache_claim", "ALIGND_JOBSET_MODEL_CACHE_CLAIM"),
                           ("cluster_domain", "ALIGND_JOBSET_CLUSTER_DOMAIN")):
            value = get(name)
            if value is not None:
                updates[attr] = value
        for attr, name in (("grace_period_s", "ALIGND_JOBSET_GRACE_SECONDS"),
                           ("rdzv_timeout_s", "ALIGND_JOBSET_RENDEZVOUS_TIMEOUT"),
                           ("ttl_seconds_after_finished", "ALIGND_JOBSET_TTL_SECONDS")):
            value = get(name)
            if value is not None:
                try:
                    updates[attr] = int(value)
                except ValueError:
                    raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if get("ALIGND_JOBSET_ENV_FROM") is not None:
            updates["env_from"] = parse_env_from(get("ALIGND_JOBSET_ENV_FROM") or "")
        if get("ALIGND_JOBSET_NODE_SELECTOR") is not None:
            updates["node_selector"] = pairs("ALIGND_JOBSET_NODE_SELECTOR")
        return replace(config, **updates)


def parse_env_from(spec: str) -> tuple[EnvSource, ...]:
    """``configmap:alignd-config,secret:alignd-secrets`` → ``envFrom`` sources, in order."""
    kinds: dict[str, Literal["configMapRef", "secretRef"]] = {"configmap": "configMapRef", "secret": "secretRef"}
    sources = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, name = item.partition(":")
        if not sep or kind.strip().lower() not in kinds or not name.strip():
            raise ValueError(f"ALIGND_JOBSET_ENV_FROM entry {item!r} is not configmap:NAME or secret:NAME")
        sources.append(EnvSource(kinds[kind.strip().lower()], name.strip()))
    return tuple(sources)


def jobset_name(job_id: str, nodes: int = 1) -> str:
    """The JobSet's name for a job: its id, which is unique, lower-case and DNS-safe (``ftjob-<hex>``).

    There is one JobSet per job at a time; a restart deletes the old one before it submits the next.
    Refused (``ValueError``) when the name is not a DNS-1035 label or when the longest pod name
    (``<name>-node-0-<M-1>-xxxxx``) would pass 63 characters."""
    name = job_id.lower()
    longest_pod = f"{name}-{REPLICATED_JOB}-0-{max(nodes - 1, 0)}"
    if not _DNS_1035.match(name) or len(longest_pod) + _POD_SUFFIX > 63:
        raise ValueError(f"job id {job_id!r} cannot name a JobSet: its pod names must be DNS-1035 labels "
                         "of at most 63 characters")
    return name


def leader_address(name: str, config: JobSetConfig) -> str:
    """The fully qualified DNS name of pod 0 of job 0: the c10d rendezvous host."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}.{config.namespace}.svc.{config.cluster_domain}"


def rank_command(job_id: str, *, nodes: int, gpus_per_node: int, endpoint: str, rdzv_id: str,
                 rdzv_timeout_s: int = 900, python: str = "python") -> list[str]:
    """torchrun for one node of the job: the same command on every node (c10d assigns node ranks).

    A local launcher backend can run this same command M times on one machine with a localhost
    endpoint; on Kubernetes every pod of the JobSet runs it."""
    return [python, "-m", "torch.distributed.run",
            "--nnodes", str(nodes), "--nproc-per-node", str(gpus_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
            "--rdzv-conf", f"join_timeout={rdzv_timeout_s},read_timeout={rdzv_timeout_s}",
            "--max-restarts", "0",
            "-m", "workers.launch", job_id]


def _labels(config: JobSetConfig, job_id: str, name: str) -> dict[str, str]:
    return {**dict(config.labels), "app.kubernetes.io/name": "alignd",
            "app.kubernetes.io/component": "training-rank", JOB_ID_LABEL: job_id, GROUP_LABEL: name}


def pod_template(job_id: str, name: str, *, nodes: int, gpus_per_node: int, config: JobSetConfig) -> dict[str, Any]:
    """The pod every rank of the job runs in (a ``PodTemplateSpec``)."""
    endpoint = f"{leader_address(name, config)}:{config.rdzv_port}"
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
           {"name": NODE_RANK_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
           *({"name": k, "value": v} for k, v in config.env)]
    resources = {"cpu": config.cpu, "memory": config.memory, GPU: str(gpus_per_node)}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": config.image,
        "command": rank_command(job_id, nodes=nodes, gpus_per_node=gpus_per_node, endpoint=endpoint,
                                rdzv_id=name, rdzv_timeout_s=config.rdzv_timeout_s),
        "ports": [{"name": "rendezvous", "containerPort": config.rdzv_port, "protocol": "TCP"}],
        "envFrom": [{source.kind: {"name": source.name}} for source in config.env_from],
        "env": env,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": DATA_DIR},
                         {"name": "models", "mountPath": MODEL_CACHE_DIR},
                         {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if config.image_pull_policy:
        container["imagePullPolicy"] = config.image_pull_policy
    models: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": config.model_cache_claim}} if config.model_cache_claim
        else {"emptyDir": {"sizeLimit": config.model_cache_size}})
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": config.service_account,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": config.grace_period_s,
        "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {GROUP_LABEL: name}}, "topologyKey": "kubernetes.io/hostname"}]}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": config.run_as_user,
                            "runAsGroup": config.run_as_user, "fsGroup": config.run_as_user,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {}}, {"name": "models", **models},
                    {"name": "tmp", "emptyDir": {}},
                    # NCCL shares memory through /dev/shm (64 MiB by default in a pod)
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}}],
    }
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    return {"metadata": {"labels": _labels(config, job_id, name)}, "spec": spec}


def build_jobset(job_id: str, *, nodes: int, gpus_per_node: int, config: JobSetConfig,
                 annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JobSet (a plain dict, ready for the API) that runs ``job_id`` on ``nodes`` × ``gpus_per_node``."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("a JobSet needs at least one node and one GPU per node")
    name = jobset_name(job_id, nodes)
    labels = _labels(config, job_id, name)
    if config.local_queue:
        labels[KUEUE_QUEUE_LABEL] = config.local_queue
    if config.priority_class:
        labels[KUEUE_PRIORITY_LABEL] = config.priority_class
    job_spec = {"parallelism": nodes, "completions": nodes, "completionMode": "Indexed", "backoffLimit": 0,
                "template": pod_template(job_id, name, nodes=nodes, gpus_per_node=gpus_per_node, config=config)}
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels,
                     "annotations": {"alignd.dev/nodes": str(nodes), "alignd.dev/gpus-per-node": str(gpus_per_node),
                                     **(annotations or {})}},
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "successPolicy": {"operator": "All"},
            "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                                "template": {"metadata": {"labels": dict(labels)}, "spec": job_spec}}],
        },
    }


def inherit_from_pod(config: JobSetConfig, pod: Mapping[str, Any], container: str | None = None,
                     *, keep_image: bool = False, keep_env_from: bool = False) -> JobSetConfig:
    """Take the image, pull policy, pull secrets and ``envFrom`` of the supervising worker's own pod
    (a pod as the API returns it, camelCase keys), so the rank pods run what the worker runs."""
    spec = pod.get("spec") or {}
    containers: Sequence[Mapping[str, Any]] = spec.get("containers") or []
    chosen = next((c for c in containers if container is None or c.get("name") == container), None)
    if chosen is None:
        return config
    updates: dict[str, Any] = {"namespace": (pod.get("metadata") or {}).get("namespace") or config.namespace}
    if not keep_image and chosen.get("image"):
        updates["image"] = chosen["image"]
        updates["image_pull_policy"] = chosen.get("imagePullPolicy")
    if not keep_env_from and chosen.get("envFrom"):
        sources = []
        for entry in chosen["envFrom"]:
            for kind in ("configMapRef", "secretRef"):
                if entry.get(kind, {}).get("name"):
                    sources.append(EnvSource(kind, entry[kind]["name"]))  # type: ignore[arg-type]
        updates["env_from"] = tuple(sources)
    secrets = tuple(s["name"] for s in spec.get("imagePullSecrets") or [] if s.get("name"))
    if secrets:
        updates["image_pull_secrets"] = secrets
    return replace(config, **updates)
