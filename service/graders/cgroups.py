"""A cgroup per python-grader call, where the kernel lets this process make one: memory and process
limits for the whole sandbox together, on top of the per-process rlimits.

``RLIMIT_AS`` bounds one process, so a grader that forks N children could use N times the memory
limit; a memory cgroup bounds them all (the kernel's OOM killer ends the sandbox past it), and a
pids cgroup bounds their number whatever uid they run as. Containers rarely let a process create
cgroups, so this is best effort and the rlimits stay the guarantee:

- ``auto`` (``ALIGND_GRADER_CGROUP``, the default): cgroup v1 ``memory`` and ``pids`` hierarchies
  that this process can write, below its own cgroup (so the sandbox stays inside the container's
  accounting); otherwise none.
- a path: a delegated cgroup v2 directory with the ``memory`` and ``pids`` controllers enabled in
  its ``cgroup.subtree_control`` (``systemd-run --scope -p Delegate=yes`` or a k8s pod's delegated
  subtree); each call gets a child there.
- ``off``: none.

The sandbox joins its cgroups before anything else runs: the launcher shell writes its own pid into
each ``cgroup.procs`` and then ``exec``s prlimit → bwrap → setpriv → python, so every process of the
sandbox is born inside them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("alignd.graders.sandbox")

PARENT = "alignd-graders"
#: an empty sandbox cgroup older than this was abandoned (``Cgroups.sweep``)
STALE_SECONDS = 60.0

#: the launcher: join every cgroup.procs named after the count, then become the sandbox command
JOIN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'


@dataclass
class CgroupSet:
    """The cgroups of one sandbox call."""

    dirs: list[Path]

    def launcher(self, command: list[str]) -> list[str]:
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["/bin/sh", "-c", JOIN, "sh", str(len(procs)), *procs, *command]

    def oom_killed(self) -> bool:
        for d in self.dirs:
            for name, marker in (("memory.events", "oom_kill "), ("memory.oom_control", "oom_kill ")):
                with contextlib.suppress(OSError):
                    for line in (d / name).read_text().splitlines():
                        if line.startswith(marker) and int(line.split()[1]) > 0:
                            return True
            with contextlib.suppress(OSError, ValueError):
                if int((d / "memory.failcnt").read_text()) > 0:
                    return True
        return False

    def remove(self) -> None:
        """Kill whatever is left in the cgroups and remove them."""
        for d in self.dirs:
            for _ in range(50):
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                log.warning("could not remove sandbox cgroup %s", d)


@dataclass
class Cgroups:
    """Where sandbox cgroups are made: one parent directory per hierarchy (v1) or one (v2)."""

    parents: list[Path]
    version: int

    def sweep(self, older_than: float = STALE_SECONDS) -> int:
        """Remove abandoned sandbox cgroups: empty ``g-*`` directories older than ``older_than`` s.

        A sandbox's launcher joins its cgroup milliseconds after the mkdir, so an empty one that old
        belongs to a call whose owner died before its ``remove`` (a worker SIGKILLed mid-grade);
        without this they pile up for the life of the machine. Returns how many were removed."""
        removed, cutoff = 0, time.time() - older_than
        for parent in self.parents:
            with contextlib.suppress(OSError):
                for d in parent.iterdir():
                    with contextlib.suppress(OSError):
                        if d.name.startswith("g-") and d.stat().st_mtime < cutoff \
                                and not (d / "cgroup.procs").read_text().strip():
                            d.rmdir()
                            removed += 1
        return removed

    def create(self, memory_bytes: int, processes: int) -> CgroupSet | None:
        self.sweep()
        name = f"g-{secrets.token_hex(6)}"
        made: list[Path] = []
        try:
            for parent in self.parents:
                d = parent / name
                d.mkdir()
                made.append(d)
                if self.version == 2:
                    (d / "memory.max").write_text(str(memory_bytes))
                    if (d / "memory.swap.max").exists():
                        (d / "memory.swap.max").write_text("0")
                    (d / "pids.max").write_text(str(processes))
                elif (d / "memory.limit_in_bytes").exists():
                    (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
                    memsw = d / "memory.memsw.limit_in_bytes"
                    if memsw.exists():
                        with contextlib.suppress(OSError):
                            memsw.write_text(str(memory_bytes))
                else:
                    (d / "pids.max").write_text(str(processes))
        except OSError as exc:
            log.warning("sandbox cgroup not created (%s); relying on rlimits", exc)
            CgroupSet(made).remove()
            return None
        return CgroupSet(made)


def _v1_mounts() -> dict[str, tuple[Path, str]]:
    """controller → (mount point, root of the hierarchy that mount shows)."""
    mounts: dict[str, tuple[Path, str]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) < 3 or tail[0] != "cgroup" or len(fields) < 5:
                continue
            for option in tail[2].split(","):
                if option in ("memory", "pids"):
                    mounts[option] = (Path(fields[4]), fields[3])
    return mounts


def _own_v1_paths() -> dict[str, str]:
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


def detect(setting: str = "auto") -> Cgroups | None:
    """The cgroups this process may create for sandboxes, per ``ALIGND_GRADER_CGROUP``; None when none."""
    if setting == "off":
        return None
    if setting != "auto":
        root = Path(setting)
        enabled = set()
        with contextlib.suppress(OSError):
            enabled = set((root / "cgroup.subtree_control").read_text().split())
        if not {"memory", "pids"} <= enabled:
            log.warning("ALIGND_GRADER_CGROUP=%s: memory and pids are not enabled in its cgroup.subtree_control",
                        setting)
            return None
        return Cgroups([root], 2)
    mounts, own = _v1_mounts(), _own_v1_paths()
    parents: list[Path] = []
    for controller in ("memory", "pids"):
        if controller not in mounts or controller not in own:
            return None
        mount, mount_root = mounts[controller]
        relative = os.path.relpath(own[controller], mount_root)
        if relative.startswith(".."):
            return None
        parent = (mount / relative / PARENT).resolve()
        try:
            parent.mkdir(exist_ok=True)
        except OSError:
            return None
        if not os.access(parent, os.W_OK):
            return None
        parents.append(parent)
    return Cgroups(parents, 1)
