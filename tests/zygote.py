"""Warm starts for the tests' Celery workers: fork them from a process that has the training stack loaded.

A worker's start costs ~4.5 s of CPU, nearly all of it importing torch, transformers and peft
(``workers.process_model.preload_training_stack``), and the suite starts about thirty of them: crash,
fencing and shutdown tests each need workers of their own to kill. So each test process keeps a
*zygote*: a child (``python -m tests.zygote``) that imports the third-party stack once and then forks
a worker on request. The fork sets the worker's environment, session, working directory and log,
and runs Celery's own entry point with ``alignd worker``'s exact arguments (``service.cli.worker_command``):
a real Celery worker process, with the real signals and process group, that starts in a fraction of a
second. The zygote is the worker's parent, so it reaps it and reports its exit status back to the
test process, which sees it through :class:`WarmProcess` (the part of ``subprocess.Popen`` the tests use).

Nothing of alignd is imported before the fork (``workers.celery_app`` reads its settings from the
environment at import time), only libraries that read no ``ALIGND_*`` variable. Other variables may
have been read at import (``HF_HUB_OFFLINE``, ``TQDM_DISABLE``, the thread-pool sizes), and a test
process's environment changes during a run (the S3 fixture's credentials, the console's quiet
switches), so there is one zygote per environment (:func:`zygote_for`): it runs with exactly the
worker's environment less the ``ALIGND_*`` variables (and pytest's ``PYTEST_CURRENT_TEST``), which
only the fork receives. A worker sees what a cold start would have seen.

Protocol, one JSON object a line: the test process writes ``{"argv", "env", "cwd", "log"}`` to the
zygote's stdin; the zygote answers ``{"pid": n}`` (or ``{"error": "..."}``) and later, for every
worker that ends, ``{"exited": pid, "code": returncode}`` (``Popen.returncode``'s convention: minus
the signal number for a worker killed by a signal). End of input ends the zygote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

#: What the zygote imports before it forks: the training stack a worker preloads, minus alignd.
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.trainer_utils", "peft",
           "accelerate", "celery.bin.celery", "celery.worker", "kombu", "sqlalchemy", "botocore", "boto3",
           "prometheus_client", "redis")


# --------------------------------------------------------------------------- the test process's side


class WarmProcess:
    """A worker forked by the zygote, seen like the ``subprocess.Popen`` of a child process."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self.zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.zygote.exit_code(self.pid, timeout=timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """A zygote for one environment: ended with the test process (its stdin closes)."""

    def __init__(self, env: dict[str, str]) -> None:
        repo = Path(__file__).resolve().parent.parent
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=repo, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=self.env)
        self.lock = threading.Lock()  # one request at a time
        self.changed = threading.Condition()
        self.replies: list[dict[str, Any]] = []
        self.exits: dict[int, int] = {}
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                if "exited" in message:
                    self.exits[int(message["exited"])] = int(message["code"])
                else:
                    self.replies.append(message)
                self.changed.notify_all()
        with self.changed:  # the zygote is gone: nothing more will arrive
            self.replies.append({"error": "the zygote exited"})
            self.changed.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, argv: list[str], env: dict[str, str], log: Path) -> WarmProcess:
        log.write_bytes(b"")  # there (and empty) before this returns, as a Popen's redirected output is
        request = {"argv": argv, "env": env, "log": str(log), "cwd": str(Path.cwd())}
        with self.lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            with self.changed:
                self.changed.wait_for(lambda: bool(self.replies), timeout=120)
                reply = self.replies.pop(0) if self.replies else {"error": "no answer from the zygote in 120 s"}
        if "error" in reply:
            raise RuntimeError(f"zygote: {reply['error']}")
        return WarmProcess(self, int(reply["pid"]), argv)

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.exits or not self.alive(), timeout=timeout)
            return self.exits.get(pid)


def imported_with(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` a zygote runs with: all but what only the worker reads (``ALIGND_*``, and
    pytest's ``PYTEST_CURRENT_TEST``, set anew for each test)."""
    return {k: v for k, v in env.items() if not k.startswith("ALIGND_") and k != "PYTEST_CURRENT_TEST"}


_ZYGOTES: dict[frozenset[tuple[str, str]], Zygote] = {}


def zygote_for(env: dict[str, str]) -> Zygote:
    """This test process's zygote for workers with ``env``, started on first use (and again if it died)."""
    base = imported_with(env)
    key = frozenset(base.items())
    if key not in _ZYGOTES or not _ZYGOTES[key].alive():
        _ZYGOTES[key] = Zygote(base)
    return _ZYGOTES[key]


# --------------------------------------------------------------------------- the zygote's side


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the worker ``request`` describes, and never return."""
    code = 1
    try:
        os.setsid()  # its own session and process group, like ``Popen(start_new_session=True)``
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter has
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)  # sys.stdout and sys.stderr write to fds 1 and 2: the log from here on
        os.dup2(log, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the zygote's pipes, like ``Popen(close_fds=True)``
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        if argv[1:3] != ["-m", "celery"]:
            raise ValueError(f"the zygote starts Celery workers only, not {argv!r}")
        sys.argv = ["celery", *argv[3:]]
        import celery.__main__

        celery.__main__.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker's log says why
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """The zygote: import the stack, then fork a worker for each request until stdin closes."""
    import importlib
    import selectors

    for name in PRELOAD:
        importlib.import_module(name)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd hears of every exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the test run is the test process's to handle
    inbox: IO[bytes] = os.fdopen(os.dup(0), "rb", buffering=0)
    selector = selectors.DefaultSelector()
    selector.register(inbox, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    pending = b""

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            out.write(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")

    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 4096)
                reap()
                continue
            chunk = inbox.read(65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    pid = os.fork()
                except Exception as exc:  # noqa: BLE001 - answered, the zygote goes on
                    out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
                    continue
                if pid == 0:
                    _child(request)
                out.write(json.dumps({"pid": pid}) + "\n")


if __name__ == "__main__":
    serve()
