"""Multi-node jobs without a cluster: each node of the group is a process group on this machine.

:class:`LocalBackend` implements the supervisor's ``Backend`` protocol (``workers.jobset_supervisor``)
the way the JobSet does on Kubernetes, so a job with ``resources.nodes`` = M runs through exactly
the same supervision (submit, mirror node phases, cancel/pause, restart from the latest checkpoint
when a node fails) and the same rank code:

* ``submit`` starts M ``torchrun`` agents, one per node, each the command every JobSet pod runs
  (``workers.jobset.rank_command``) with a c10d rendezvous on ``127.0.0.1:<free port>`` (whichever
  agent binds the port first hosts the store, as pod 0 does in the cluster) and ``--max-restarts 0``.
  Every agent is its own session (process group), started with the worker's settings in its
  environment (``workers.launch.settings_env``), ``ALIGND_NODE_RANK`` = its node number, and
  ``PR_SET_PDEATHSIG`` so that it dies with the worker. With CUDA, node ``i`` sees GPUs
  ``i·G … i·G+G-1`` of this machine; without, the ranks use gloo on the CPU (the tests).
* ``status``: a node is ``running`` while its agent lives, then ``succeeded`` (exit 0) or ``failed``
  (exit code or signal). torchrun's own workers run in sessions of their own: their pids are
  recorded while the agent lives, so that deleting a group also reaches ranks whose agent was
  killed (the ranks also die with their agent, see ``workers.launch.main``).
* ``delete`` sends SIGTERM to every agent's process group and every recorded rank, SIGKILL
  ``KILL_GRACE`` seconds later; the group is ``GONE`` once none of them is left.
* ``logs``: the tail of each failed node's output file (or of every node's).

Each attempt gets a fresh port and rendezvous id, so a new attempt never meets an old one's store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from service.settings import Settings
from workers.jobset import NODE_RANK_ENV, rank_command
from workers.jobset_supervisor import GONE, GroupStatus, NodePhase, NodeState, RankGroup
from workers.launch import ATTEMPT_ENV, _die_with_parent, _free_port, settings_env

log = logging.getLogger("alignd.worker")

KILL_GRACE = 15.0
RENDEZVOUS_TIMEOUT_S = 300


@dataclass
class _Node:
    index: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    ranks: dict[int, psutil.Process] = field(default_factory=dict)  # torchrun's workers, by pid

    def alive(self) -> list[psutil.Process]:
        found = []
        for proc in self.ranks.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found


@dataclass
class _Group:
    name: str
    nodes: list[_Node]
    deleted_at: float | None = None
    killed: bool = False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_node(node: _Node, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.proc.pid, sig)  # the agent's process group
    for proc in node.alive():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _gpu_slices(nodes: int, per_node: int) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` of each node, or None without CUDA; ValueError if the machine has too few."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if len(devices) < nodes * per_node:
        raise ValueError(f"this machine has {len(devices)} GPUs; {nodes} local nodes × {per_node} GPUs need "
                         f"{nodes * per_node}")
    return [",".join(devices[i * per_node:(i + 1) * per_node]) for i in range(nodes)]


class LocalBackend:
    """Node groups as local process groups (module docstring); one instance per supervised job."""

    def __init__(self, settings: Settings, *, log_dir: Path | None = None,
                 rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="alignd-nodes-"))
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.environ = dict(os.environ if environ is None else environ)
        self.groups: dict[str, _Group] = {}
        self.attempts = 0

    # ------------------------------------------------------------------------------ Backend

    def submit(self, group: RankGroup) -> None:
        if group.name in self.groups:
            raise RuntimeError(f"{group.name} exists already")
        gpus = _gpu_slices(group.nodes, group.gpus_per_node)
        self.attempts += 1
        endpoint = f"127.0.0.1:{_free_port()}"
        command = rank_command(group.job_id, nodes=group.nodes, gpus_per_node=group.gpus_per_node,
                               endpoint=endpoint, rdzv_id=f"{group.name}-{self.attempts}",
                               rdzv_timeout_s=self.rendezvous_timeout_s, python=sys.executable)
        nodes = []
        for index in range(group.nodes):
            env = {**self.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1",
                   NODE_RANK_ENV: str(index), ATTEMPT_ENV: str(group.attempt or 0)}
            if gpus is None:
                env["ACCELERATE_USE_CPU"] = "true"  # gloo on the CPU
            else:
                env["CUDA_VISIBLE_DEVICES"] = gpus[index]
            path = self.log_dir / f"{group.name}-{self.attempts}-node-{index}.log"
            out = path.open("wb")
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            nodes.append(_Node(index, proc, path, out))
        log.info("job %s: started %d local nodes (%s), rendezvous %s", group.job_id, group.nodes,
                 ", ".join(str(n.proc.pid) for n in nodes), endpoint)
        self.groups[group.name] = _Group(group.name, nodes)

    def status(self, name: str) -> GroupStatus:
        group = self.groups.get(name)
        if group is None:
            return GONE
        for node in group.nodes:
            self._record_ranks(node)
        if group.deleted_at is not None:
            if self._finished(group):
                self._forget(group)
                return GONE
            if not group.killed and time.monotonic() - group.deleted_at > KILL_GRACE:
                group.killed = True
                for node in group.nodes:
                    _signal_node(node, signal.SIGKILL)
        states = []
        for node in group.nodes:
            code = node.proc.poll()
            phase: NodePhase = "running" if code is None else "succeeded" if code == 0 else "failed"
            states.append(NodeState(node.index, f"{name}-node-{node.index} (pid {node.proc.pid})", phase,
                                    _reason(code) if code else ""))
        return GroupStatus(exists=True, admitted=True, nodes=tuple(states))

    def delete(self, name: str) -> None:
        group = self.groups.get(name)
        if group is None or group.deleted_at is not None:
            return
        group.deleted_at = time.monotonic()
        for node in group.nodes:
            self._record_ranks(node)
            _signal_node(node, signal.SIGTERM)

    def logs(self, name: str, tail_lines: int = 50) -> str:
        group = self.groups.get(name)
        if group is None:
            return ""
        failed = [n for n in group.nodes if n.proc.poll() not in (None, 0)]
        parts = []
        for node in failed or group.nodes:
            node.log_file.flush()
            try:
                lines = node.log_path.read_text(errors="replace").splitlines()[-tail_lines:]
            except OSError as exc:
                lines = [f"(no log: {exc})"]
            parts.append(f"--- {name} node {node.index} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------ the rest

    def close(self) -> None:
        """Take down whatever is still running (the supervisor is leaving: the worker stops)."""
        for group in list(self.groups.values()):
            for node in group.nodes:
                _signal_node(node, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=KILL_GRACE)
            self._forget(group)

    def _record_ranks(self, node: _Node) -> None:
        if node.proc.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(node.proc.pid).children(recursive=True):
                node.ranks.setdefault(child.pid, child)

    def _finished(self, group: _Group) -> bool:
        return all(node.proc.poll() is not None and not _group_exists(node.proc.pid) and not node.alive()
                   for node in group.nodes)

    def _forget(self, group: _Group) -> None:
        for node in group.nodes:
            with contextlib.suppress(OSError):
                node.log_file.close()
        self.groups.pop(group.name, None)
