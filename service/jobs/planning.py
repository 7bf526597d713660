"""Before a job is queued: its memory estimate, the queue that can hold it, and (for ``dry_run``)
how many tokens and steps it will take and roughly how long.

The arithmetic lives in ``service.resources``; this module turns a request into its inputs: the
base model's config (following ``ft:`` models back to their base), the training file's analysis
(token counts estimated at upload), and the throughput measured on earlier jobs of the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from service.db.models import File, Job
from service.db.repositories import OrgRepository
from service.db.telemetry import measured_tokens_per_second
from service.errors import APIError
from service.files import file_analysis
from service.jobs.spec import JobCreate, LoraTraining, ResourcesConflict
from service.resources import (
    InsufficientResources,
    JobShape,
    MemoryEstimate,
    ModelConfigError,
    ModelShape,
    Placement,
    fmt_bytes,
    load_model_config,
    place,
)
from service.settings import Settings

BYTES_PER_TOKEN = 4.0   # without an analysis: a JSONL file's size over ~4 bytes per token
LENGTH_MARGIN = 1.25    # analysis token counts are estimates (chars / 4); chat templates add a few


@dataclass
class JobPlan:
    base_model: str
    placement: Placement
    gpus: int                 # GPUs of each node
    examples: int
    tokens_per_epoch: int
    total_steps: int
    total_tokens: int
    tokens_per_second: float
    tokens_per_second_source: str
    notes: list[str]
    nodes: int = 1

    @property
    def estimate(self) -> MemoryEstimate | None:
        return self.placement.estimate

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def resources(self) -> dict[str, Any]:
        """What the job row keeps and the job object shows: ``gpus`` is the total number of ranks;
        a job on several nodes also names ``nodes`` and ``gpus_per_node`` (the worker launches those)."""
        if self.estimate:
            strategy = self.estimate.strategy
        elif self.nodes > 1:
            strategy = "ddp"  # unknown shape: the recipe decides at launch
        else:
            strategy = "single" if self.gpus == 1 else "ddp"
        if self.nodes == 1:
            return {"gpus": self.gpus, "strategy": strategy}
        return {"gpus": self.world_size, "nodes": self.nodes, "gpus_per_node": self.gpus, "strategy": strategy}


def base_model_of(repo: OrgRepository, model: str) -> str:
    """``ft:…`` names → the base model their weights start from (validated by the caller)."""
    return repo.lineage(model).base


def _shape(settings: Settings, name: str, notes: list[str]) -> ModelShape | None:
    config = load_model_config(name, settings)
    if config is None:
        notes.append(f"no config.json is known for '{name}': the memory estimate is unavailable")
        return None
    try:
        return ModelShape.from_config(config)
    except (ModelConfigError, TypeError, ValueError) as exc:
        notes.append(f"config.json of '{name}' could not be read ({exc}): the memory estimate is unavailable")
        return None


def job_shape(spec: JobCreate) -> JobShape:
    hp = spec.method.hyperparameters()
    training = spec.training_type
    lora = isinstance(training, LoraTraining)
    return JobShape(
        method=spec.method.type, lora=lora,
        lora_r=training.r if isinstance(training, LoraTraining) else 0,
        lora_target_modules=tuple(training.target_modules) if isinstance(training, LoraTraining) else (),
        batch_size=hp.batch_size, max_length=hp.max_length, gradient_checkpointing=hp.gradient_checkpointing,
        rollout_batch_size=int(getattr(hp, "rollout_batch_size", 16)) if spec.method.type != "reinforcement"
        else hp.batch_size * int(getattr(hp, "group_size", 8)),
        mini_batch_size=int(getattr(hp, "mini_batch_size", 4)),
        gradient_accumulation_steps=int(hp.gradient_accumulation_steps),
    )


def reward_is_adapter(repo: OrgRepository, model: str, reward_name: str) -> bool:
    """Whether PPO's recipe will load the reward model as an adapter on the policy's base: a LoRA reward
    model trained on exactly the weights this job starts from (the same base and parent fine-tunes)."""
    job = repo.job_by_fine_tuned_model(reward_name)
    if job is None or (job.training_type or {}).get("type", "lora") != "lora":
        return False
    mine, theirs = repo.lineage(model), repo.lineage(job.model)
    return (mine.base, mine.adapter_keys) == (theirs.base, theirs.adapter_keys)


def _file_tokens(f: File, method: str) -> tuple[int, int | None]:
    """(tokens one epoch processes, longest example in tokens or None)."""
    tokens = (file_analysis(f) or {}).get("tokens") or {}
    if not tokens.get("total"):
        return int(f.bytes / BYTES_PER_TOKEN), None
    total = int(tokens["total"])
    if method in ("dpo", "reward_model"):  # the prompt runs twice: once with each completion
        total += int(tokens.get("prompt") or 0)
    longest = tokens.get("max_per_example")
    return total, int(math.ceil(longest * LENGTH_MARGIN)) + 16 if longest else None


def _steps(examples: int, spec: JobCreate) -> tuple[int, float]:
    """(total optimizer steps, share of the planned epochs they cover), as ``workers.loop.plan_steps``."""
    hp = spec.method.hyperparameters()
    per_step = hp.batch_size if spec.method.type != "ppo" else int(getattr(hp, "rollout_batch_size", 16))
    micro = max(1, math.ceil(examples / per_step))
    per_epoch = max(1, math.ceil(micro / hp.gradient_accumulation_steps))
    planned = per_epoch * hp.n_epochs
    total = min(planned, hp.max_steps) if hp.max_steps else planned
    return total, total / planned


def resource_layout(spec: JobCreate) -> tuple[int, int]:
    """``(nodes, gpus_per_node)`` of the request, or a 400 naming the ``resources`` field at fault."""
    if spec.resources is None:
        return 1, 1
    try:
        return spec.resources.layout()
    except ResourcesConflict as exc:
        raise APIError(400, exc.message, code="invalid_request", param=exc.param) from None


def plan_job(repo: OrgRepository, settings: Settings, spec: JobCreate) -> JobPlan:
    """Estimate and route ``spec`` (already validated); raises a 400 ``insufficient_resources``."""
    notes: list[str] = []
    base = base_model_of(repo, spec.model)
    model = _shape(settings, base, notes)
    reward_shape = None
    shape = job_shape(spec)
    reward_name = getattr(spec.method.hyperparameters(), "reward_model", None)
    if spec.method.type == "ppo" and reward_name:
        reward_shape = _shape(settings, base_model_of(repo, reward_name), notes)
        shape = replace(shape, reward_adapter=reward_is_adapter(repo, spec.model, reward_name))
    training_file = repo.get_file(spec.training_file, "training_file")
    tokens_per_epoch, longest = _file_tokens(training_file, spec.method.type)
    nodes, gpus = resource_layout(spec)
    try:
        placement = place(settings.placement.queues, model, shape, devices=gpus, nodes=nodes,
                          sequence_length=longest, reward_model=reward_shape)
    except InsufficientResources as exc:
        raise APIError(400, exc.message, code="insufficient_resources", param="resources") from None
    if placement.estimate is None:
        notes.append(f"routed to the largest queue, '{placement.queue.name}'")
    total_steps, covered = _steps(training_file.n_examples, spec)
    hp = spec.method.hyperparameters()
    total_tokens = int(tokens_per_epoch * hp.n_epochs * covered)
    measured = measured_tokens_per_second(repo.session, spec.model, spec.method.type)
    source = "measured on earlier jobs of this model" if measured else "configured (ALIGND_TOKENS_PER_SECOND)"
    return JobPlan(base_model=base, placement=placement, gpus=gpus, examples=training_file.n_examples,
                   tokens_per_epoch=tokens_per_epoch, total_steps=total_steps, total_tokens=total_tokens,
                   tokens_per_second=measured or settings.placement.tokens_per_second,
                   tokens_per_second_source=source, notes=notes, nodes=nodes)


def apply_plan(job: Job, plan: JobPlan) -> None:
    job.resources = plan.resources
    job.queue = plan.placement.queue.name
    job.estimated_memory_bytes = plan.estimate.bytes if plan.estimate else None


def plan_message(plan: JobPlan) -> str:
    memory = (f"about {fmt_bytes(plan.estimate.bytes)} per device ({plan.estimate.strategy})"
              if plan.estimate else "memory unknown")
    if plan.nodes > 1:
        memory += f" on {plan.nodes} nodes × {plan.gpus} GPUs"
    return f"Estimated {memory}; routed to queue '{plan.placement.queue.name}'"


def present_estimate(spec: JobCreate, plan: JobPlan) -> dict[str, Any]:
    """What ``dry_run`` answers: the plan, and no job."""
    estimate = plan.estimate
    seconds = plan.total_tokens / plan.tokens_per_second if plan.tokens_per_second > 0 else None
    return {
        "object": "fine_tuning.job.estimate",
        "model": spec.model,
        "base_model": plan.base_model,
        "method": spec.method.type,
        "training_type": "lora" if isinstance(spec.training_type, LoraTraining) else "full",
        "resources": plan.resources,
        "queue": plan.placement.queue.name,
        "estimated_memory_bytes": estimate.bytes if estimate else None,
        "memory": estimate.to_dict() if estimate else None,
        "examples": plan.examples,
        "tokens_per_epoch": plan.tokens_per_epoch,
        "total_tokens": plan.total_tokens,
        "total_steps": plan.total_steps,
        "tokens_per_second": round(plan.tokens_per_second, 2),
        "tokens_per_second_source": plan.tokens_per_second_source,
        "estimated_duration_seconds": round(seconds, 1) if seconds is not None else None,
        "notes": plan.notes,
    }
