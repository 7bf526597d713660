"""Rules for jobs that name other jobs' models: a PPO job's ``reward_model``.

A PPO job names the ``fine_tuned_model`` of a reward-model job of the same organization that has
succeeded. Each way of getting that wrong has its own code, all on the same ``param``; another
organization's model answers exactly like one that does not exist.
"""

from __future__ import annotations

from service.db.models import Job
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.jobs.spec import JobCreate, LoraTraining, PpoHyperparameters
from service.model_registry import is_base_model
from service.settings import Settings

REWARD_MODEL_PARAM = "method.ppo.hyperparameters.reward_model"


def _error(message: str, code: str) -> APIError:
    return APIError(400, message, code=code, param=REWARD_MODEL_PARAM)


def _job_named(repo: OrgRepository, name: str) -> Job | None:
    """The job whose fine-tuned model ``name`` is, or will be once it succeeds.

    ``ft:<base>:<org>:<suffix>:<job id>`` ends with the job id, so a job still running is found by
    its id: that is how a PPO job created too early learns that its reward model is not ready.
    """
    if not name.startswith("ft:"):
        return None
    job = repo.job_by_fine_tuned_model(name)
    if job is not None:
        return job
    job_id = name.rsplit(":", 1)[-1]
    try:
        job = repo.get_job(job_id)  # this organization's only
    except APIError:
        return None
    return job if job.fine_tuned_model is None else None


def validate_ppo(repo: OrgRepository, settings: Settings, spec: JobCreate) -> None:
    hp = spec.method.hyperparameters()
    assert isinstance(hp, PpoHyperparameters)
    if hp.mini_batch_size > hp.rollout_batch_size:
        raise APIError(400, f"mini_batch_size ({hp.mini_batch_size}) cannot exceed rollout_batch_size "
                       f"({hp.rollout_batch_size})", code="invalid_request",
                       param="method.ppo.hyperparameters.mini_batch_size")
    if not isinstance(spec.training_type, LoraTraining):
        raise APIError(400, "PPO trains LoRA adapters (policy and value share one frozen base); "
                       "training_type 'full' is not supported", code="invalid_request", param="training_type")
    name = hp.reward_model
    if not name:
        raise _error("a PPO job needs method.ppo.hyperparameters.reward_model: the fine_tuned_model of a "
                     "succeeded reward_model job", "reward_model_required")
    if is_base_model(name, settings):
        raise _error(f"reward_model '{name}' is a base model; name the fine_tuned_model of a reward_model job",
                     "reward_model_not_a_reward_model")
    job = _job_named(repo, name)
    if job is None:
        raise _error(f"reward_model '{name}' is not one of your fine-tuned models", "reward_model_not_found")
    method_type = (job.method or {}).get("type")
    if method_type != "reward_model":
        raise _error(f"reward_model '{name}' comes from a '{method_type}' job ({job.id}), not a reward_model job",
                     "reward_model_not_a_reward_model")
    if job.status != "succeeded":
        raise _error(f"reward_model '{name}' comes from job {job.id}, which is {job.status}; it must have "
                     "succeeded", "reward_model_not_ready")
