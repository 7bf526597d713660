"""``bench/gpu.py --smoke``: every method's step on a tiny config on the CPU, with the service's packages
(litestar, celery, TRL) made unimportable, as on the GPU machine that has only torch, transformers,
accelerate and peft. The four lines parse, and their MFU is the FLOP count of the module docstring on a
parameter count done by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

#: what the GPU machine lacks (it has torch, transformers, accelerate, peft and their dependencies)
BLOCKED = ("litestar", "celery", "kombu", "redis", "trl", "datasets", "boto3", "botocore", "sqlalchemy",
           "prometheus_client", "rich", "moto")
#: runs a script (or ``-m module``) with BLOCKED absent: ``sys.modules[name] = None`` is how Python marks
#: a module missing, so ``import`` fails and ``importlib.util.find_spec`` (libraries' availability
#: checks) answers None, as on a machine without them
HARNESS = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""
# The tiny config (bench/gpu.py TINY) by hand: per layer q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up and
# down 64x128 each = 36864, two RMSNorms 128; 2 layers; final norm 64; the tied 512x64 head once.
TINY_MATMUL_PARAMETERS = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128) + 64 + 512 * 64


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HARNESS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_the_harness_really_blocks_the_service_packages(tmp_path: Path) -> None:
    script = tmp_path / "imports_celery.py"
    script.write_text("import celery\n")
    out = _run(str(script))
    assert out.returncode != 0 and "import of celery halted" in out.stderr


def test_the_gpu_tests_collect_without_the_service() -> None:
    """``pytest --noconftest -m gpu``, as the GPU session runs them: the modules import without the service."""
    out = _run("-m", "pytest", "--noconftest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "tests/test_gpu_numerics.py", "tests/test_gpu_bench.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = [line for line in out.stdout.splitlines() if "::test_" in line]
    assert len(collected) == 5, out.stdout  # four numerics tests and the estimate-against-peak one


def test_gpu_bench_smoke_runs_every_method_without_the_service() -> None:
    out = _run(str(REPO / "bench" / "gpu.py"), "--smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("gpu_bench method=")]
    rows = {fields["method"]: fields for fields in
            ({k: v for k, _, v in (f.partition("=") for f in line[1:])} for line in lines)}
    assert list(rows) == ["sft", "dpo", "reinforcement", "ppo"], out.stdout
    for method, r in rows.items():
        assert r["model"] == "tiny"
        tokens_per_s, mfu = float(r["tokens_per_s"]), float(r["mfu"])
        assert tokens_per_s > 0 and 0 < mfu < 1, r
        assert int(r["peak_memory_bytes"]) > 0 and int(r["estimate_bytes"]) > 0, r
        share = float(r["generation_share"])
        assert (0 < share < 1) if method in ("reinforcement", "ppo") else share == 0, r
    for method, flops_per_token in (("sft", 4), ("dpo", 6)):
        r = rows[method]
        expected = float(r["tokens_per_s"]) * flops_per_token * TINY_MATMUL_PARAMETERS / 989e12
        assert float(r["mfu"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.gpu
def test_on_cuda_the_estimate_holds_the_measured_peak_of_smollm2() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--models", "smollm2-135m", "--steps",
                          "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in out.stdout.splitlines():
        if line.startswith("gpu_bench method="):
            r = dict(f.partition("=")[::2] for f in line.split()[1:])
            # max_memory_allocated counts tensors only: leave out the estimate's 1 GiB for the CUDA context
            ratio = (int(r["estimate_bytes"]) - 2**30) / int(r["peak_memory_bytes"])
            assert 0.8 <= ratio <= 1.2, line
