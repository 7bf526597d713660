"""The python-grader sandbox against a hostile tenant: real bubblewrap, real limits, no mocks.

Each escape is a grader that *tries* something and reports whether it worked (its reward), so a test
fails if the attempt succeeds; where the attempt should be killed instead, the test checks the flag
and that it was stopped in time. Where the target must really be reachable from outside the sandbox
(Redis, the object store, a listening "API" socket), the test checks that from the test process
first, so a pass means the sandbox stopped it, not that nothing was there.
"""

from __future__ import annotations

import os
import shutil
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from service.graders import Sandbox, SandboxLimits, grade

SECRET = "alignd-canary-5f1e9c"

if shutil.which("bwrap") is None or os.geteuid() != 0:  # pragma: no cover - CI installs bubblewrap, runs as root
    if os.environ.get("CI"):
        raise RuntimeError("tests/test_grader_sandbox.py needs bubblewrap (apt-get install bubblewrap) and root")
    pytest.skip("bubblewrap is not installed or not root", allow_module_level=True)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(wall_seconds=20, cpu_seconds=20, memory_bytes=1 << 30, processes=24,
                                 tmp_bytes=32 << 20, output_bytes=256 << 10))


def python(source: str) -> dict[str, Any]:
    return {"type": "python", "name": "tenant", "source": textwrap.dedent(source)}


def run(sandbox: Sandbox, source: str, item: Any = None, timeout: float = 20) -> Any:
    return grade(python(source), "model output", item or {}, sandbox=sandbox, timeout=timeout)


@pytest.fixture
def listening() -> Iterator[int]:
    """A TCP server on 127.0.0.1 standing in for the API (accepts and answers one byte)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.sendall(b"!")
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    server.close()


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_a_plain_grader_gets_sample_and_item(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        def grade(sample, item):
            return len(sample["output_text"]) + item["bonus"]
    """, {"bonus": 0.5})
    assert not result.errors.any, result.errors
    assert result.reward == len("model output") + 0.5


def test_no_secret_from_the_environment_or_other_processes(sandbox: Sandbox,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGND_TEST_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert os.environ["ALIGND_TEST_SECRET"] == SECRET  # the worker process really holds it
    result = run(sandbox, f"""
        import os
        def grade(sample, item):
            found = 0.0
            if any("{SECRET}" in v for v in os.environ.values()):
                found += 1
            for pid in [item["parent"], "self", "1", *[p for p in os.listdir("/proc") if p.isdigit()]]:
                for name in ("environ", "cmdline"):
                    try:
                        if b"{SECRET}" in open(f"/proc/{{pid}}/{{name}}", "rb").read():
                            found += 10
                    except OSError:
                        pass
            try:
                os.kill(item["parent"], 0)  # does the test process even exist from here?
                found += 100
            except OSError:
                pass
            visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            return found + 1000 * (len(visible) > 2)
    """, {"parent": os.getpid()})
    assert not result.errors.any, result.errors
    assert result.reward == 0.0


def test_the_data_dir_is_neither_listed_nor_read_nor_written(sandbox: Sandbox, tmp_path: Path) -> None:
    data_dir = tmp_path / "alignd-data"
    data_dir.mkdir()
    (data_dir / "alignd.db").write_text("tenant rows")
    (data_dir / "credentials").write_text(SECRET)
    result = run(sandbox, """
        import os
        def grade(sample, item):
            escaped = 0.0
            root = item["data_dir"]
            for attempt in (lambda: os.listdir(root), lambda: open(root + "/credentials").read(),
                            lambda: open(root + "/pwned", "w").write("x"), lambda: os.listdir("/root"),
                            lambda: open("/etc/passwd").read(), lambda: open("/usr/pwned", "w").write("x"),
                            lambda: os.listdir("/work"), lambda: os.listdir("/home")):
                try:
                    attempt()
                    escaped += 1
                except OSError:
                    pass
            return escaped
    """, {"data_dir": str(data_dir)})
    assert not result.errors.any, result.errors
    assert result.reward == 0.0
    assert sorted(p.name for p in data_dir.iterdir()) == ["alignd.db", "credentials"]
    assert not Path("/usr/pwned").exists()


def test_no_network_to_the_api_redis_or_the_object_store(sandbox: Sandbox, listening: int, s3_endpoint: str) -> None:
    s3_port = int(s3_endpoint.rsplit(":", 1)[1].split("/")[0])
    targets = {"api": listening, "redis": 6379, "s3": s3_port}
    for name, port in targets.items():  # they are really there for anyone outside the sandbox
        assert reachable(port), f"{name} on port {port} is not reachable from the test process"
    result = run(sandbox, """
        import socket
        def grade(sample, item):
            connected = 0.0
            for port in item["ports"]:
                for host in ("127.0.0.1", "localhost", "::1"):
                    try:
                        socket.create_connection((host, port), timeout=1).close()
                        connected += 1
                    except OSError:
                        pass
            try:  # and nothing outside either
                socket.create_connection(("1.1.1.1", 53), timeout=1).close()
                connected += 100
            except OSError:
                pass
            return connected
    """, {"ports": list(targets.values())})
    assert not result.errors.any, result.errors
    assert result.reward == 0.0


def test_allocating_gigabytes_fails(sandbox: Sandbox) -> None:
    caught = run(sandbox, """
        def grade(sample, item):
            try:
                block = bytearray(4 << 30)
                return float(len(block))
            except MemoryError:
                return 0.0
    """)
    assert caught.reward == 0.0 and not caught.errors.any
    uncaught = run(sandbox, """
        def grade(sample, item):
            chunks = [bytearray(256 << 20) for _ in range(16)]  # 4 GiB in 256 MiB pieces
            return float(len(chunks))
    """)
    assert uncaught.reward == 0.0
    assert uncaught.errors.python_grader_runtime_error
    assert "MemoryError" in (uncaught.errors.python_grader_runtime_error_details or "")


def test_forking_hundreds_of_processes_is_capped_and_cleaned_up(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import os, time
        def grade(sample, item):
            started = 0
            for _ in range(400):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                started += 1
            return float(started)
    """)
    assert not result.errors.any, result.errors
    assert 0 < result.reward < sandbox.limits.processes  # RLIMIT_NPROC held: the unprivileged uid counts
    time.sleep(0.5)
    low, high = sandbox.uid_base, sandbox.uid_base + sandbox.uid_span
    leftovers = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and low <= p.info["uids"].real < high]
    assert leftovers == []  # the PID namespace ended with the call: no sleeping child survived


def test_an_endless_loop_hits_the_wall_clock_limit(sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = run(sandbox, """
        def grade(sample, item):
            while True:
                pass
    """, timeout=2)
    assert time.monotonic() - started < 6
    assert result.reward == 0.0 and result.errors.unresponsive_reward_error


def test_cpu_time_limit_kills_a_busy_grader() -> None:
    tight = Sandbox(SandboxLimits(wall_seconds=30, cpu_seconds=1))
    started = time.monotonic()
    result = run(tight, """
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)  # ignoring the soft limit only reaches the hard one
        def grade(sample, item):
            while True:
                pass
    """, timeout=30)
    assert time.monotonic() - started < 10
    assert result.reward == 0.0 and result.errors.python_grader_runtime_error
    assert "killed" in (result.errors.python_grader_runtime_error_details or "")


def test_a_huge_string_or_flood_of_output_is_not_a_reward(sandbox: Sandbox) -> None:
    text = run(sandbox, """
        def grade(sample, item):
            return "1" * 50_000_000
    """)
    assert text.reward == 0.0 and text.errors.python_grader_runtime_error
    assert "returned str" in (text.errors.python_grader_runtime_error_details or "")
    flood = run(sandbox, """
        import os
        def grade(sample, item):
            for _ in range(1000):
                os.write(1, b"9" * 65536)  # straight at the answer channel's fd
            return 1.0
    """)
    assert flood.reward == 0.0 and flood.errors.python_grader_runtime_error
    assert "output limit" in (flood.errors.python_grader_runtime_error_details or "")
    for bad in ("None", "float('nan')", "[1.0]", "10 ** 400"):
        result = run(sandbox, f"def grade(sample, item):\n    return {bad}\n")
        assert result.reward == 0.0 and result.errors.python_grader_runtime_error, bad


def test_exceptions_and_exits_are_runtime_errors(sandbox: Sandbox) -> None:
    raised = run(sandbox, "def grade(sample, item):\n    return item['missing']\n")
    assert raised.errors.python_grader_runtime_error
    assert "KeyError: 'missing'" in (raised.errors.python_grader_runtime_error_details or "")
    exited = run(sandbox, "import os\ndef grade(sample, item):\n    os._exit(0)\n")
    assert exited.reward == 0.0 and exited.errors.python_grader_runtime_error


SEED_GRADER = """
import subprocess, sys

def grade(sample, item):
    # the model's code and one unit test per process, each with its own timeout
    passed = 0
    for test in item["tests"]:
        program = sample["output_text"] + "\\n" + test + "\\n"
        try:
            done = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=5)
            passed += done.returncode == 0
        except subprocess.TimeoutExpired:
            pass
    return passed / len(item["tests"])
"""


def test_the_seed_code_case_runs_model_code_against_unit_tests(sandbox: Sandbox) -> None:
    item = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5",
                      "assert add('a', 'b') == 'ab'"]}
    right = "def add(a, b):\n    return a + b"
    assert grade(python(SEED_GRADER), right, item, sandbox=sandbox).reward == pytest.approx(3 / 4)
    wrong = "def add(a, b):\n    return a - b"  # fails all four
    assert grade(python(SEED_GRADER), wrong, item, sandbox=sandbox).reward == 0.0
    hostile = "import os\nopen('/tmp/x', 'w')\ndef add(a, b):\n    while True: pass"  # loops: each test times out
    started = time.monotonic()
    result = grade(python(SEED_GRADER), hostile, {"tests": item["tests"][:1]}, sandbox=sandbox)
    assert result.reward == 0.0 and not result.errors.any
    assert time.monotonic() - started < 10


def test_after_the_escapes_a_plain_grader_still_works(sandbox: Sandbox) -> None:
    assert run(sandbox, "def grade(sample, item):\n    return 0.5\n").reward == 0.5


FORK_AND_HOLD = """
import os, time
def grade(sample, item):
    children = []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            block = bytearray(300 << 20)  # zero-filled: really resident
            time.sleep(1.0)               # held while the others allocate
            os._exit(0)
        children.append(pid)
    held = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        held += status == 0
    return float(held)
"""


def test_a_cgroup_bounds_memory_across_processes() -> None:
    limits = SandboxLimits(wall_seconds=30, cpu_seconds=30, memory_bytes=1 << 30, processes=24)
    bounded = Sandbox(limits)
    if not bounded.uses_cgroup:  # pragma: no cover - a container that may not create cgroups
        pytest.skip("this process may not create cgroups; the per-process rlimits are the only memory bound")
    # per process, 300 MiB is within RLIMIT_AS: without the cgroup all six children hold it at once
    unbounded = run(Sandbox(limits, cgroup="off"), FORK_AND_HOLD, timeout=30)
    assert unbounded.reward == 6.0, unbounded.errors
    together = run(bounded, FORK_AND_HOLD, timeout=30)
    assert together.reward <= 3.0  # 1 GiB for the whole sandbox: the OOM killer ended the rest
    parents = bounded._cgroups.parents if bounded._cgroups else []
    assert parents and all(not any(p.name.startswith("g-") for p in parent.iterdir()) for parent in parents)


def test_abandoned_sandbox_cgroups_are_swept_and_live_ones_kept() -> None:
    """A worker SIGKILLed mid-grade never removes its sandbox's cgroups; the next sandbox's create
    sweeps the empty ones (older than a minute; here any age) and leaves one with a process in it."""
    import subprocess

    bounded = Sandbox(SandboxLimits(wall_seconds=5, cpu_seconds=5, memory_bytes=1 << 30, processes=8))
    if bounded._cgroups is None:  # pragma: no cover - a container that may not create cgroups
        pytest.skip("this process may not create cgroups")
    parents = bounded._cgroups.parents
    abandoned, live = [p / "g-abandoned0" for p in parents], [p / "g-liveproc00" for p in parents]
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for d in (*abandoned, *live):
            d.mkdir()
        for d in live:
            (d / "cgroup.procs").write_text(str(sleeper.pid))
        assert bounded._cgroups.sweep(older_than=0) >= len(parents)  # ours, and any left by a killed worker
        assert not any(d.exists() for d in abandoned) and all(d.exists() for d in live)
        assert bounded._cgroups.sweep(older_than=3600) == 0  # a fresh empty one would be kept too
    finally:
        sleeper.kill()
        sleeper.wait()
        time.sleep(0.1)
        for d in live:
            if d.exists():
                d.rmdir()
    assert not any(d.exists() for d in live)
