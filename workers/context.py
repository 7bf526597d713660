"""Everything a recipe needs about its job, reloaded from the database by the task (never pickled)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.jobs.spec import CommonHyperparameters, Method, TrainingType
from service.settings import Settings
from service.storage import ObjectStore
from workers.reporting import Reporter


class JobFailure(Exception):
    """A failure the user can act on: becomes the job's ``error`` {code, message, param}."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


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
    reporter: Reporter
    workdir: Path
    # (step, storage key) of the checkpoint to resume from; set by the task when one exists
    resume_from: tuple[int, str] | None = None
    # the claim's attempt number: object keys carry it, so a fenced-out worker never overwrites the
    # checkpoints or the adapter of the attempt that replaced it
    attempt: int = 0
    # set by the training loop while it writes a checkpoint, so the archive carries the whole state
    training_state: dict[str, Any] | None = None

    @property
    def hyperparameters(self) -> CommonHyperparameters:
        return self.method.hyperparameters()

    def read_jsonl(self, key: str) -> list[dict[str, Any]]:
        """Files were validated at upload; blank lines are the only thing skipped here."""
        with self.store.open_read(key) as stream:
            return [json.loads(line) for line in stream.read().decode("utf-8").splitlines() if line.strip()]


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled" | "paused" | "preempted" (checkpointed; the task re-queues it)
    trained_tokens: int
    final_metrics: dict[str, float]
    adapter_key: str | None = None
    summary: dict[str, Any] | None = None
    step: int | None = None
    # a job whose product is a file (generate_preferences), not a model: the file object's id
    output_file_id: str | None = None
