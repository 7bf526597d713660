"""The zygote the tests fork their Celery workers from (``tests/zygote.py``) behaves like ``Popen``:
the worker is its own session, sees the environment it was given and not the zygote's, and its exit
status (a signal's included) comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from service.cli import worker_command
from tests.conftest import make_settings
from tests.processes import stop
from tests.zygote import WarmProcess, zygote_for


def _ready(proc: WarmProcess, log: Path) -> None:
    deadline = time.time() + 120
    while b" ready." not in log.read_bytes():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")} | extra
    env["ALIGND_DATA_DIR"] = str(tmp_path / "data")
    return env


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)])
def test_a_forked_worker_is_its_own_session_with_the_given_environment(tmp_path: Path, sig: int, code: int) -> None:
    env = _worker_env(tmp_path)
    warm = zygote_for(env)
    assert "ALIGND_DATA_DIR" not in warm.env  # only the fork is given the worker's own settings
    log = tmp_path / "worker.log"
    worker = warm.fork(worker_command(make_settings(tmp_path / "data")), env, log)
    try:
        _ready(worker, log)
        process = psutil.Process(worker.pid)
        assert os.getsid(worker.pid) == worker.pid and os.getpgid(worker.pid) == worker.pid
        assert process.ppid() == warm.proc.pid
        # it configured itself from the environment it was given (``/proc/<pid>/environ`` still shows the
        # block the zygote was exec'd with: the kernel records only that one)
        assert str(tmp_path / "data" / "broker") in log.read_text()
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=0.2)
        worker.send_signal(sig)  # SIGTERM: Celery's warm shutdown, exit 0; SIGKILL: killed
        assert worker.wait(timeout=30) == code
        assert worker.poll() == code
    finally:
        stop(worker)  # a failed assertion must not leave the worker running


def test_one_zygote_per_environment_and_only_celery_workers(tmp_path: Path) -> None:
    env = _worker_env(tmp_path)
    warm = zygote_for(env)
    assert zygote_for({**env, "ALIGND_QUEUE": "q", "PYTEST_CURRENT_TEST": "another test"}) is warm
    other = zygote_for({**env, "HF_HOME": "/elsewhere"})  # a library may have read it at import
    assert other is not warm and other.env["HF_HOME"] == "/elsewhere"
    assert psutil.Process(other.proc.pid).environ()["HF_HOME"] == "/elsewhere"
    log = tmp_path / "refused.log"
    refused = warm.fork([sys.executable, "-c", "print('hi')"], env, log)
    assert refused.wait(timeout=60) == 1
    assert "starts Celery workers only" in log.read_text()
