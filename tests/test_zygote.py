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
from tests.zygote import WarmProcess, zygote


def _ready(proc: WarmProcess, log: Path) -> None:
    deadline = time.time() + 120
    while b" ready." not in log.read_bytes():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)])
def test_a_forked_worker_is_its_own_session_with_the_given_environment(tmp_path: Path, sig: int, code: int) -> None:
    warm = zygote()
    settings = make_settings(tmp_path / "data")
    # this process's environment, not the zygote's: that one holds whatever ALIGND_* a test had set when
    # the zygote started (a production fixture's broker URL, say)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env["ALIGND_DATA_DIR"] = str(tmp_path / "data")
    assert warm.can_fork_for(env)
    log = tmp_path / "worker.log"
    worker = warm.fork(worker_command(settings), env, log)
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


def test_only_celery_workers_and_only_for_an_environment_like_its_own(tmp_path: Path) -> None:
    warm = zygote()
    assert not warm.can_fork_for({**warm.env, "HF_HOME": "/elsewhere"})  # a library may have read it at import
    assert warm.can_fork_for({**warm.env, "PYTEST_CURRENT_TEST": "another test"})
    log = tmp_path / "refused.log"
    refused = warm.fork([sys.executable, "-c", "print('hi')"], dict(warm.env), log)
    assert refused.wait(timeout=60) == 1
    assert "starts Celery workers only" in log.read_text()
