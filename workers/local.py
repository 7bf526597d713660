"""Recipes without the service: a job context over a local directory and a reporter that keeps what it
is told in memory.

Tests and ``bench/`` run the real recipes in-process with these (no database, no broker, no API),
and the GPU machine, which has torch but not the service's stack, runs ``bench/gpu.py`` the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs.spec import CommonHyperparameters, Method, TrainingType
from service.settings import Settings
from service.storage import LocalStore
from workers.context import JobContext, ModelRef
from workers.distributed import gather_metrics


@dataclass
class MemoryReporter:
    """The reporter interface a recipe uses (``workers.context.JobReporter``), into lists.

    ``stop_at`` (step -> "pause" | "cancel") makes the stop check answer like the database would once
    that many steps are done; ``on_step`` runs after each step is recorded (tests kill or time there)."""

    events: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[tuple[int, dict[str, float], str]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)
    stop_at: dict[int, str] = field(default_factory=dict)
    on_step: Callable[[int, dict[str, float]], None] | None = None
    done: int = 0
    #: ``time.perf_counter()`` when training started (``progress``) and after each step (benchmarks)
    stamps: list[float] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return True

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
              type: str = "message") -> None:  # noqa: A002 - the Reporter's signature
        self.events.append((message, level, data))

    def step(self, step: int, total_steps: int, values: dict[str, float], *, trained_tokens: int) -> None:
        values = gather_metrics(values)  # combined over the ranks, as the database reporter does
        self.done = step
        self.stamps.append(time.perf_counter())
        self.steps.append((step, dict(values)))
        self.metrics.append((step, dict(values)))
        if self.on_step is not None:
            self.on_step(step, values)

    def metrics_only(self, step: int, values: dict[str, float]) -> None:
        self.metrics.append((step, dict(gather_metrics(values))))

    def progress(self, *, step: int, total_steps: int) -> None:
        self.done = step
        self.stamps = [time.perf_counter()]

    def checkpoint(self, step: int, metrics: dict[str, float], storage_key: str) -> None:
        self.checkpoints.append((step, dict(metrics), storage_key))

    def drop_checkpoint(self, storage_key: str) -> None:
        self.checkpoints = [c for c in self.checkpoints if c[2] != storage_key]

    def stop_reason(self, *, min_interval: float = 0.5) -> str | None:
        return self.stop_at.get(self.done)

    def resumed(self, step: int) -> None:
        self.resumed_at.append(step)
        self.done = step

    def restart(self) -> None:
        self.steps.clear()
        self.metrics.clear()

    def series(self, name: str) -> list[float]:
        return [values[name] for _, values in self.steps if name in values]

    def messages(self, level: str | None = None) -> list[str]:
        return [message for message, lvl, _ in self.events if level is None or lvl == level]


def write_jsonl(store: LocalStore, key: str, rows: Iterable[dict[str, Any]]) -> str:
    store.put_bytes(key, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return key


def local_context(workdir: Path, *, model: str, method: Method, training_type: TrainingType,
                  training_rows: Iterable[dict[str, Any]], validation_rows: Iterable[dict[str, Any]] | None = None,
                  seed: int = 0, settings: Settings | None = None, store: LocalStore | None = None,
                  reporter: MemoryReporter | None = None, job_id: str = "ftjob-local",
                  references: dict[str, ModelRef] | None = None,
                  parent_adapter_keys: list[str] | None = None, strategy: str = "single",
                  extra_files: dict[str, Iterable[dict[str, Any]]] | None = None) -> JobContext:
    """A context for ``model`` (a registry base) whose files live in ``workdir/objects``.

    Several ranks (torchrun) may each build one over the same ``store``; ``strategy="fsdp"`` then
    shards a full fine-tune (``workers.fsdp``), and every rank's reporter sees the combined metrics.
    ``extra_files``: further files by hyperparameter field (``retention_file``), as ``ctx.file_keys``."""
    store = store or LocalStore(workdir / "objects")
    training_key = write_jsonl(store, f"files/{job_id}-train", training_rows)
    validation_key = (write_jsonl(store, f"files/{job_id}-validation", validation_rows)
                      if validation_rows is not None else None)
    return JobContext(job_id=job_id, organization_name="local", model=model, base_model=model,
                      parent_adapter_keys=list(parent_adapter_keys or []), method=method,
                      training_type=training_type, seed=seed, suffix=None, training_file_key=training_key,
                      validation_file_key=validation_key, settings=settings or Settings.from_env(workdir / "data"),
                      store=store, reporter=reporter or MemoryReporter(), workdir=workdir,
                      references=dict(references or {}), strategy=strategy,
                      file_keys={name: write_jsonl(store, f"files/{job_id}-{name}", rows)
                                 for name, rows in (extra_files or {}).items()})


def method_of(kind: str, hp: CommonHyperparameters) -> Method:
    """``Method(type=kind, <kind>=<Body>(hyperparameters=hp))`` without naming the body class."""
    from service.jobs.spec import _METHOD_BODIES

    return Method(type=kind, **{kind: _METHOD_BODIES[kind](hyperparameters=hp)})  # type: ignore[arg-type]
