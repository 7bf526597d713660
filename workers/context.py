"""Everything a recipe needs about its job, built by ``workers.runner`` from the database (never pickled).

A recipe sees its job only through a :class:`JobContext`: the spec, the resolved model references,
the object store and a reporter. It never opens a database session, so a recipe can also run with
no service at all (tests, ``bench/``): :mod:`workers.local` builds a context over a local directory
with a reporter that keeps everything in memory. This module therefore imports nothing heavier than
the typed spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from service.jobs.spec import CommonHyperparameters, Method, TrainingType

if TYPE_CHECKING:
    from service.settings import Settings
    from service.storage import ObjectStore

H = TypeVar("H", bound=CommonHyperparameters)


class JobFailure(Exception):
    """A failure the user can act on: becomes the job's ``error`` {code, message, param}."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


class JobReporter(Protocol):
    """What a recipe may say about its job (``workers.reporting.Reporter`` writes it to the database)."""

    @property
    def is_main(self) -> bool: ...

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None,
              type: str = "message") -> None: ...  # noqa: A002 - the API's field is called "type"

    def step(self, step: int, total_steps: int, values: dict[str, float], *, trained_tokens: int) -> None: ...

    def metrics_only(self, step: int, values: dict[str, float]) -> None: ...

    def progress(self, *, step: int, total_steps: int) -> None: ...

    def checkpoint(self, step: int, metrics: dict[str, float], storage_key: str) -> None: ...

    def drop_checkpoint(self, storage_key: str) -> None: ...

    def stop_reason(self, *, min_interval: float = 0.5) -> str | None: ...

    def resumed(self, step: int) -> None: ...


@dataclass(frozen=True)
class ModelRef:
    """A fine-tuned model another job's spec names (a PPO job's ``reward_model``, a judge), resolved by
    the runner before ``setup``: the job that made it, its base and parent chain, and its archive."""

    name: str
    job_id: str
    method_type: str
    base_model: str
    parent_adapter_keys: list[str]
    adapter_key: str


@dataclass
class JobContext:
    job_id: str
    organization_name: str
    model: str
    base_model: str
    parent_adapter_keys: list[str]
    method: Method
    training_type: TrainingType
    seed: int
    suffix: str | None
    training_file_key: str
    validation_file_key: str | None
    settings: Settings
    store: ObjectStore
    reporter: JobReporter
    workdir: Path
    # (step, storage key) of the checkpoint to resume from; set by the runner when one exists
    resume_from: tuple[int, str] | None = None
    #: the claim's attempt number: object keys carry it, so a fenced-out worker never overwrites the
    #: checkpoints or the adapter of the attempt that replaced it
    attempt: int = 0
    #: model references named by the spec, by field name (``reward_model``, ``judge``)
    references: dict[str, ModelRef] = field(default_factory=dict)
    #: how the ranks share the model (``resources.strategy``: single, ddp, fsdp); ``workers.fsdp``
    #: shards a full fine-tune when it is ``fsdp`` and there are several ranks
    strategy: str = "single"
    #: storage keys of further files the hyperparameters name, by field (a DPO job's ``retention_file``)
    file_keys: dict[str, str] = field(default_factory=dict)

    @property
    def hyperparameters(self) -> CommonHyperparameters:
        return self.method.hyperparameters()

    def hyperparameters_as(self, kind: type[H]) -> H:
        """The method's hyperparameters as the recipe's own type (a wrong method is a bug, not input)."""
        hp = self.method.hyperparameters()
        if not isinstance(hp, kind):
            raise TypeError(f"job {self.job_id} has {type(hp).__name__}, the recipe expects {kind.__name__}")
        return hp

    def reference(self, field_name: str) -> ModelRef:
        ref = self.references.get(field_name)
        if ref is None:
            raise JobFailure("model_not_found", f"the job names no {field_name}", field_name)
        return ref

    def read_jsonl(self, key: str) -> list[dict[str, Any]]:
        """Files were validated at upload; blank lines are the only thing skipped here."""
        with self.store.open_read(key) as stream:
            return [json.loads(line) for line in stream.read().decode("utf-8").splitlines() if line.strip()]


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled" | "paused" | "preempted" (checkpointed; the runner re-queues it)
    trained_tokens: int
    final_metrics: dict[str, float]
    adapter_key: str | None = None
    summary: dict[str, Any] | None = None
    step: int | None = None
    #: a job whose product is a file (generate_preferences), not a model: the local file the runner
    #: registers as a file object of the job's organization
    output_path: Path | None = None
    output_filename: str | None = None
