"""Multi-GPU jobs: the worker runs the job's recipe as N processes under ``accelerate launch``.

``supervise`` (in the Celery worker, after the claim) starts::

    accelerate launch --num_processes N --multi_gpu ... -m workers.launch <job_id>

in its own process group and watches it:

* every rank runs the same recipe (``workers.runner.run_claimed``); data parallelism comes from accelerate
  (``Accelerator.prepare`` wraps the model in DDP) or, for a full fine-tune whose strategy is ``fsdp``
  (one the estimate could not fit on one GPU), from the recipe itself (``workers.fsdp``: FSDP2's
  ``fully_shard``; the launcher is the same ``--multi_gpu`` one), and from
  ``workers.data.length_bucketed_batches`` giving each rank its slice of every global batch;
* only rank 0 writes to the database and the object store (``Reporter``, ``save_model_archive``);
  the step metrics it writes are combined over all ranks (``workers.distributed``);
* cancel and pause: rank 0 reads the request and every rank stops at the same step; if the group
  has not exited ``STOP_GRACE`` seconds later, the supervisor terminates the whole process group
  (SIGTERM, then SIGKILL). If the worker itself dies, the launcher gets SIGTERM (``PR_SET_PDEATHSIG``)
  and torchrun takes the ranks down with it;
* a group that exits while the job is still ``running`` (a rank crashed before rank 0 could record
  anything) fails the job with the tail of its output.

Without CUDA (tests, CPU workers) the ranks run on the CPU with the gloo backend
(``ACCELERATE_USE_CPU``), which is how the test suite checks that 2 processes reproduce the
1-process loss curve.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from service.db.engine import session_scope
from service.db.repositories import JobLost, JobRunRepository
from service.settings import Settings
from service.state import AppState
from workers.reporting import Reporter

log = logging.getLogger("alignd.worker")

STOP_GRACE = 60.0
#: The claim's attempt number, passed to the ranks (every rank's Reporter is fenced on it).
ATTEMPT_ENV = "ALIGND_JOB_ATTEMPT"
KILL_GRACE = 15.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment under which ``Settings.from_env()`` in a rank equals ``settings``."""
    env = {
        "ALIGND_DATA_DIR": str(settings.data_dir),
        "ALIGND_DATABASE_URL": settings.database.url,
        "ALIGND_QUEUE": settings.broker.queue,
        "ALIGND_STORAGE_URL": settings.storage.url,
        "ALIGND_MODEL_CACHE": str(settings.model_cache_dir),
        "ALIGND_MODELS": ",".join(f"{k}={v}" for k, v in settings.models.items()),
    }
    if not settings.broker.embedded:
        env["ALIGND_BROKER_URL"] = settings.broker.url
    if settings.storage.s3_endpoint_url:
        env["ALIGND_S3_ENDPOINT_URL"] = settings.storage.s3_endpoint_url
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(job_id: str, gpus: int, strategy: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    # FSDP is not accelerate's here: the recipe shards the model itself from the job's strategy
    # (``workers.fsdp``), the same way under accelerate launch as under torchrun on several nodes.
    del strategy
    return [*cmd, "--multi_gpu", "-m", "workers.launch", job_id]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _job_status(state: AppState, job_id: str) -> str:
    with session_scope(state.sessions) as session:
        return JobRunRepository(session, job_id).job().status


def supervise(state: AppState, job_id: str, reporter: Reporter, resources: dict[str, Any]) -> str:
    """Run a claimed job on ``resources["gpus"]`` processes; returns the status it ended in."""
    import torch  # only to know whether the ranks get GPUs

    gpus, strategy = int(resources["gpus"]), str(resources.get("strategy") or "ddp")
    env = {**os.environ, **settings_env(state.settings), "PYTHONUNBUFFERED": "1",
           ATTEMPT_ENV: str(reporter.attempt or 0)}  # the ranks' writes carry the claim's fence
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # gloo on the CPU
    elif torch.cuda.device_count() < gpus:
        reporter.event(f"Job failed: this worker has {torch.cuda.device_count()} GPUs, the job asks "
                       f"for {gpus}", level="error", data={"code": "insufficient_resources"})
        with session_scope(state.sessions) as session:
            JobRunRepository(session, job_id, reporter.attempt).finish("failed", error={
                "code": "insufficient_resources", "param": "resources.gpus",
                "message": f"the worker has {torch.cuda.device_count()} GPUs; the job asks for {gpus}"})
        return "failed"
    cmd = launch_command(job_id, gpus, strategy, _free_port())
    reporter.event(f"Launching {gpus} processes ({strategy.upper()}) with accelerate",
                   data={"gpus": gpus, "strategy": strategy})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            log.info("[%s] %s", job_id, line)

    reader = threading.Thread(target=pump, name=f"alignd-launch-{job_id}", daemon=True)
    reader.start()
    stop_asked: float | None = None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if stop_asked is None and reporter.stop_reason() is not None:
                stop_asked = time.monotonic()  # the ranks stop at their next step
            if stop_asked is not None and time.monotonic() - stop_asked > STOP_GRACE:
                log.warning("job %s: the process group did not stop within %.0f s; terminating it",
                            job_id, STOP_GRACE)
                _terminate(proc)
    finally:
        if proc.poll() is None:  # the worker is shutting down or the supervisor failed
            _terminate(proc)
        reader.join(timeout=5)
    status = _job_status(state, job_id)
    if status == "running":
        output = "\n".join(tail)[-1500:]
        message = f"the training processes exited with code {proc.returncode} without finishing the job"
        reporter.event(f"Job failed: {message}", level="error",
                       data={"code": "training_error", "output": output})
        with session_scope(state.sessions) as session:
            JobRunRepository(session, job_id, reporter.attempt).finish("failed", error={
                "code": "training_error", "param": None, "message": f"{message}:\n{output}"[-1000:]})
        return "failed"
    return status


def main(argv: list[str] | None = None) -> int:
    """One rank: the same recipe run as ``alignd.train`` runs it, minus the claim (the supervisor did it)."""
    from workers.distributed import is_main_process
    from workers.runner import INTERRUPTED, run_claimed

    args = sys.argv[1:] if argv is None else argv
    job_id = args[0]
    # torchrun starts each rank in a session of its own: without this, a rank whose launcher was
    # killed (SIGKILL of its process group, a lost node's agent) would train on, alone, as an orphan.
    _die_with_parent()
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(message)s")
    state = AppState(Settings.from_env())
    attempt = int(os.environ.get(ATTEMPT_ENV) or 0) or None
    try:
        status = run_claimed(state, job_id, Reporter(state.sessions, job_id, attempt))
    except JobLost:
        log.warning("job %s: rank %s lost the job (attempt %s was superseded); stopping", job_id, rank, attempt)
        return 1
    log.info("job %s: rank %s ended %s", job_id, os.environ.get("RANK", "0"), status)
    # A rank that failed exits non-zero so torchrun takes the group down; rank 0 recorded the error.
    # A rank of a multi-node job that lost a peer recorded nothing: its node fails, and the
    # supervisor restarts the attempt from the latest checkpoint.
    if status == INTERRUPTED:
        return 1
    return 1 if status == "failed" and not is_main_process() else 0


if __name__ == "__main__":
    sys.exit(main())
