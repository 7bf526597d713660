"""The python-grader sandbox: tenant code under kernel-enforced isolation (bubblewrap, rlimits, a uid of its own).

Python graders are code from a tenant, run on machines that hold database and object-store
credentials, so nothing here relies on Python-level checks. Each ``grade(sample, item)`` call runs
in a fresh process tree started as

    prlimit <rlimits> -- bwrap <namespaces, read-only binds> -- setpriv <drop to uid N> -- python -I -S -c <harness>

- **No network**: a new network namespace (only a loopback that is down): no API, Redis, database or
  object store, local or remote; abstract Unix sockets are per network namespace too.
- **No other processes**: a new PID namespace with a fresh ``/proc`` (the grader sees itself only),
  plus new IPC and UTS namespaces; ``--die-with-parent`` and the PID namespace end every process the
  grader started when the call ends.
- **No files of the host**: a new mount namespace whose root is an empty tmpfs with, read-only,
  ``/usr`` (libraries), the interpreter's prefix and its site-packages (at neutral paths under
  ``/opt/alignd``), a minimal ``/dev``, and a private size-limited ``/tmp`` (the only writable
  place). alignd's data dir, config, ``/etc``, ``/root``, ``/home`` and the worker's working
  directory are not there.
- **No environment**: ``--clearenv``; the grader gets ``PATH``, ``HOME=/tmp``, ``LANG`` and
  single-threaded BLAS settings, nothing else.
- **No privileges**: ``setpriv`` switches to a uid/gid of its own (random in a configurable range, so
  concurrent sandboxes do not share limits), clears supplementary groups, empties every capability
  set and sets ``no_new_privs`` (setuid binaries in ``/usr`` cannot regain anything). Because that
  uid is not root, ``RLIMIT_NPROC`` applies — root is exempt from it, which is why the drop matters.
- **Limits** (``SandboxLimits``): CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``),
  processes/threads (``RLIMIT_NPROC``), open files (``RLIMIT_NOFILE``), file size
  (``RLIMIT_FSIZE``), no core dumps, ``/tmp`` size, wall-clock time (the parent kills the tree) and
  output size (the parent stops reading and kills at the cap). Where this process may create
  cgroups, each call also gets a memory and a pids cgroup bounding all its processes together
  (:mod:`service.graders.cgroups`).

The request travels on stdin as JSON and the answer comes back as JSON on stdout; see
:mod:`service.graders.sandbox_harness`. Every failure is a :class:`SandboxOutcome` with an error
kind, never an exception: grading turns it into reward 0 and the matching OpenAI error flag.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from service.graders.cgroups import Cgroups
from service.graders.cgroups import detect as detect_cgroups
from service.settings import GraderSettings

log = logging.getLogger("alignd.graders.sandbox")

HARNESS = (Path(__file__).with_name("sandbox_harness.py")).read_text()
SANDBOX_PYTHON = "/opt/alignd/python"
SANDBOX_SITE = "/opt/alignd/site"
#: the variables that size the numeric libraries' thread pools (OpenMP, and BLAS libraries that ignore it)
THREAD_POOL_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_SIGXCPU, _SIGKILL = 24, 9


@dataclass(frozen=True)
class SandboxLimits:
    """Defaults follow OpenAI's published python-grader limits where it has one (2 minutes, 2 GB)."""

    wall_seconds: float = 120.0
    cpu_seconds: int = 120
    memory_bytes: int = 2 << 30
    processes: int = 32
    open_files: int = 64
    file_bytes: int = 64 << 20
    tmp_bytes: int = 256 << 20
    output_bytes: int = 1 << 20


ErrorKind = Literal["runtime", "timeout", "server"]


@dataclass
class SandboxOutcome:
    reward: float | None = None
    error: ErrorKind | None = None
    details: str | None = None
    #: for ``server`` errors: a short machine-readable type (OpenAI's ``python_grader_server_error_type``)
    server_error_type: str | None = None
    stderr_tail: str = ""
    seconds: float = 0.0


@dataclass
class Sandbox:
    """Runs python graders; one instance is shared by threads (each call is its own process tree)."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    #: the interpreter prefix bound at /opt/alignd/python (default: this process's base interpreter)
    python_prefix: str | None = None
    #: directories bound read-only and put on the grader's sys.path (default: this environment's
    #: site-packages, so numpy, rapidfuzz and the rest of the installed packages are importable)
    site_dirs: tuple[str, ...] | None = None
    uid_base: int = 10_000_000
    uid_span: int = 1 << 16
    bwrap: str = "bwrap"
    #: ``auto``, ``off`` or a delegated cgroup v2 directory (service/graders/cgroups.py)
    cgroup: str = "auto"

    @cached_property
    def _cgroups(self) -> Cgroups | None:
        return detect_cgroups(self.cgroup)

    @property
    def uses_cgroup(self) -> bool:
        """Whether calls get a memory + pids cgroup of their own (best effort; rlimits always apply)."""
        return self._cgroups is not None

    @classmethod
    def from_settings(cls, settings: GraderSettings) -> Sandbox:
        """The sandbox the service's ``ALIGND_GRADER_*`` settings describe."""
        limits = SandboxLimits(wall_seconds=settings.sample_timeout, cpu_seconds=settings.cpu_seconds,
                               memory_bytes=settings.memory_bytes, processes=settings.max_processes,
                               tmp_bytes=settings.tmp_bytes)
        return cls(limits=limits, uid_base=settings.sandbox_uid_base, cgroup=settings.cgroup)

    @cached_property
    def _prefix(self) -> Path:
        return Path(self.python_prefix or sys.base_prefix).resolve()

    @cached_property
    def _interpreter(self) -> str:
        """The interpreter's path inside the sandbox (same relative path under the bound prefix)."""
        real = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
        try:
            relative = real.relative_to(self._prefix)
        except ValueError:
            relative = Path("bin") / f"python{sys.version_info.major}.{sys.version_info.minor}"
        return f"{SANDBOX_PYTHON}/{relative}"

    @cached_property
    def _sites(self) -> list[Path]:
        if self.site_dirs is not None:
            dirs = [Path(d) for d in self.site_dirs]
        else:
            paths = sysconfig.get_paths()
            dirs = [Path(paths["purelib"]), Path(paths["platlib"])]
        unique: list[Path] = []
        for d in dirs:
            resolved = d.resolve()
            if resolved.is_dir() and resolved not in unique:
                unique.append(resolved)
        return unique

    def unavailable(self) -> str | None:
        """Why the sandbox cannot run here (None when it can): checked before any tenant code runs."""
        for tool in (self.bwrap, "prlimit", "setpriv"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install bubblewrap util-linux)"
        if os.geteuid() != 0:
            return "the sandbox drops to its own uid, which needs the worker to start as root"
        return None

    def command(self, uid: int) -> list[str]:
        lim = self.limits
        prefix = [
            "prlimit", f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 1}", f"--as={lim.memory_bytes}",
            f"--nproc={lim.processes}", f"--nofile={lim.open_files}", f"--fsize={lim.file_bytes}", "--core=0",
            "--",
        ]
        fs = ["--ro-bind", "/usr", "/usr"]
        for top in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
            path = Path("/") / top
            if path.is_symlink():
                fs += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                fs += ["--ro-bind", str(path), str(path)]
        fs += ["--perms", "0755", "--dir", "/opt", "--perms", "0755", "--dir", "/opt/alignd"]
        if not _under(self._prefix, Path("/usr")):
            fs += ["--ro-bind", str(self._prefix), SANDBOX_PYTHON]
        else:
            fs += ["--symlink", str(self._prefix), SANDBOX_PYTHON]
        for index, site in enumerate(self._sites):
            fs += ["--ro-bind", str(site), f"{SANDBOX_SITE}{index}"]
        fs += ["--proc", "/proc", "--dev", "/dev", "--size", str(lim.tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp",
               "--chdir", "/tmp"]
        env = ["--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
               "--setenv", "LANG", "C.UTF-8", "--setenv", "TMPDIR", "/tmp"]
        for var in THREAD_POOL_VARS:
            env += ["--setenv", var, "1"]
        bwrap = [self.bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "grader",
                 *fs, *env, "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return [*prefix, *bwrap, *drop, self._interpreter, "-I", "-S", "-B", "-c", HARNESS]

    def run(self, source: str, sample: dict[str, Any], item: Any, timeout: float | None = None) -> SandboxOutcome:
        """Call ``grade(sample, item)`` from ``source`` in a fresh sandbox; never raises."""
        started = time.monotonic()
        reason = self.unavailable()
        if reason is not None:
            return SandboxOutcome(error="server", details=reason, server_error_type="sandbox_unavailable")
        try:
            payload = json.dumps({"source": source, "sample": sample, "item": item,
                                  "site": [f"{SANDBOX_SITE}{i}" for i in range(len(self._sites))]}).encode()
        except (TypeError, ValueError) as exc:
            return SandboxOutcome(error="runtime", details=f"sample or item is not JSON: {exc}")
        wall = min(timeout, self.limits.wall_seconds) if timeout is not None else self.limits.wall_seconds
        uid = self.uid_base + secrets.randbelow(self.uid_span)
        group = self._cgroups.create(self.limits.memory_bytes, self.limits.processes) if self._cgroups else None
        command = self.command(uid)
        try:
            outcome = self._execute(group.launcher(command) if group else command, payload, max(wall, 0.0))
            if group is not None and outcome.error == "runtime" and group.oom_killed():
                outcome.details = (f"the grader's processes used more than {self.limits.memory_bytes} bytes "
                                   "together (the sandbox's memory limit) and were killed")
        except OSError as exc:  # could not start bwrap at all
            log.exception("python grader sandbox failed to start")
            outcome = SandboxOutcome(error="server", details=f"the sandbox could not start: {exc}",
                                     server_error_type="sandbox_start_failed")
        finally:
            if group is not None:
                group.remove()
        outcome.seconds = time.monotonic() - started
        return outcome

    def _execute(self, command: list[str], payload: bytes, wall: float) -> SandboxOutcome:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, close_fds=True,
                                start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        writer = threading.Thread(target=_feed, args=(proc.stdin, payload), daemon=True)
        writer.start()
        out, err = bytearray(), bytearray()
        budget = self.limits.output_bytes
        deadline = time.monotonic() + wall
        verdict: tuple[ErrorKind, str] | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ, out)
            selector.register(proc.stderr, selectors.EVENT_READ, err)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    verdict = ("timeout", f"grade() did not return within {wall:g} s (the wall-clock limit)")
                    break
                for key, _ in selector.select(timeout=min(left, 0.5)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer: bytearray = key.data
                    buffer += chunk
                    if len(out) + len(err) > budget:
                        verdict = ("runtime", f"the grader wrote more than {budget} bytes of output "
                                              "(the output limit)")
                        break
                if verdict:
                    break
        if verdict is not None:
            _kill(proc)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic() + 1.0))
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = proc.wait()
            verdict = verdict or ("timeout", f"grade() did not return within {wall:g} s (the wall-clock limit)")
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        writer.join(timeout=1.0)
        stderr_tail = err[-4000:].decode("utf-8", "replace")
        if verdict is not None:
            return SandboxOutcome(error=verdict[0], details=verdict[1], stderr_tail=stderr_tail)
        return _interpret(code, bytes(out), stderr_tail, self.limits)


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _feed(stream: Any, payload: bytes) -> None:
    try:
        stream.write(payload)
        stream.close()
    except OSError:  # the grader exited (or was killed) before reading everything
        pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """bwrap is the session leader; killing its group ends the sandbox (its PID namespace goes with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)


def _interpret(code: int, out: bytes, stderr_tail: str, limits: SandboxLimits) -> SandboxOutcome:
    answer: dict[str, Any] | None = None
    if out:
        try:
            decoded = json.loads(out)
            answer = decoded if isinstance(decoded, dict) else None
        except ValueError:
            answer = None
    if answer is not None and isinstance(answer.get("reward"), int | float) and code == 0:
        return SandboxOutcome(reward=float(answer["reward"]), stderr_tail=stderr_tail)
    if answer is not None and answer.get("error") == "runtime":
        return SandboxOutcome(error="runtime", details=str(answer.get("details", ""))[-2000:],
                              stderr_tail=stderr_tail)
    if code in (128 + _SIGXCPU, -_SIGXCPU):
        details = f"the grader used more than {limits.cpu_seconds} s of CPU time (the CPU limit)"
    elif code in (128 + _SIGKILL, -_SIGKILL):
        details = ("the grader was killed (signal 9): it exceeded the CPU, memory or process limits "
                   f"(CPU {limits.cpu_seconds} s, memory {limits.memory_bytes} bytes, "
                   f"{limits.processes} processes)")
    elif "bwrap:" in stderr_tail or "setpriv:" in stderr_tail or "prlimit:" in stderr_tail:
        log.error("python grader sandbox failed: %s", stderr_tail[-500:])
        return SandboxOutcome(error="server", details="the sandbox could not be set up",
                              server_error_type="sandbox_setup_failed", stderr_tail=stderr_tail)
    else:
        details = f"the grader exited with status {code} without returning a reward"
    tail = stderr_tail.strip()[-800:]
    return SandboxOutcome(error="runtime", details=f"{details}{': ' + tail if tail else ''}",
                          stderr_tail=stderr_tail)
