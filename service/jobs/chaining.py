"""Rules for jobs that name other jobs' models: a PPO job's ``reward_model``, a generation job's ``judge``.

Both name the ``fine_tuned_model`` of a reward-model job of the same organization that has
succeeded. Each way of getting that wrong has its own code, all on the same ``param``; another
organization's model answers exactly like one that does not exist.
"""

from __future__ import annotations

from service.db.models import Job
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.jobs.spec import GeneratePreferencesHyperparameters, JobCreate, LoraTraining, PpoHyperparameters
from service.model_registry import is_base_model
from service.settings import Settings

REWARD_MODEL_PARAM = "method.ppo.hyperparameters.reward_model"
GENERATION_PARAM = "method.generate_preferences.hyperparameters"
JUDGE_PARAM = f"{GENERATION_PARAM}.judge"


def _error(message: str, code: str, param: str = REWARD_MODEL_PARAM) -> APIError:
    return APIError(400, message, code=code, param=param)


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
    if hp.max_length <= hp.max_new_tokens:
        raise APIError(400, f"max_length ({hp.max_length}) must exceed max_new_tokens ({hp.max_new_tokens}): "
                       "prompts get max_length - max_new_tokens tokens", code="invalid_request",
                       param="method.ppo.hyperparameters.max_length")
    if not isinstance(spec.training_type, LoraTraining):
        raise APIError(400, "PPO trains LoRA adapters (policy and value share one frozen base); "
                       "training_type 'full' is not supported", code="invalid_request", param="training_type")
    name = hp.reward_model
    if not name:
        raise _error("a PPO job needs method.ppo.hyperparameters.reward_model: the fine_tuned_model of a "
                     "succeeded reward_model job", "reward_model_required")
    check_reward_model(repo, settings, name, field="reward_model", param=REWARD_MODEL_PARAM)


def check_reward_model(repo: OrgRepository, settings: Settings, name: str, *, field: str, param: str) -> None:
    """``name`` is the fine_tuned_model of a succeeded reward_model job of this organization."""
    if is_base_model(name, settings):
        raise _error(f"{field} '{name}' is a base model; name the fine_tuned_model of a reward_model "
                     "job", "reward_model_not_a_reward_model", param)
    job = _job_named(repo, name)
    if job is None:
        raise _error(f"{field} '{name}' is not one of your fine-tuned models", "reward_model_not_found",
                     param)
    method_type = (job.method or {}).get("type")
    if method_type != "reward_model":
        raise _error(f"{field} '{name}' comes from a '{method_type}' job ({job.id}), not a "
                     "reward_model job", "reward_model_not_a_reward_model", param)
    if job.status != "succeeded":
        raise _error(f"{field} '{name}' comes from job {job.id}, which is {job.status}; it must have "
                     "succeeded", "reward_model_not_ready", param)


def validate_generate_preferences(repo: OrgRepository, settings: Settings, spec: JobCreate) -> None:
    """A judge (a succeeded reward model of this organization), a constitution, or both; one process."""
    hp = spec.method.hyperparameters()
    assert isinstance(hp, GeneratePreferencesHyperparameters)
    if hp.judge is None and hp.constitution is None:
        raise _error("a generate_preferences job needs method.generate_preferences.hyperparameters.judge "
                     "(the fine_tuned_model of a succeeded reward_model job) or .constitution (a list of "
                     "principles), or both", "judge_or_constitution_required", JUDGE_PARAM)
    if hp.constitution is not None and not hp.constitution:
        raise _error("constitution must list at least one principle", "invalid_request",
                     f"{GENERATION_PARAM}.constitution")
    if hp.constitution is not None and any(not principle.strip() for principle in hp.constitution):
        raise _error("constitution principles must not be blank", "invalid_request",
                     f"{GENERATION_PARAM}.constitution")
    if hp.judge is not None:
        if not hp.judge:
            raise _error("judge must name the fine_tuned_model of a succeeded reward_model job",
                         "judge_or_constitution_required", JUDGE_PARAM)
        check_reward_model(repo, settings, hp.judge, field="judge", param=JUDGE_PARAM)
    if hp.max_length <= hp.max_new_tokens:
        raise _error(f"max_length ({hp.max_length}) must exceed max_new_tokens ({hp.max_new_tokens}): "
                     "prompts get max_length - max_new_tokens tokens", "invalid_request",
                     f"{GENERATION_PARAM}.max_length")
    for name in ("gpus", "nodes", "gpus_per_node"):
        if spec.resources is not None and (getattr(spec.resources, name) or 1) > 1:
            raise _error(f"generate_preferences runs on one device; resources.{name} must be 1",
                         "invalid_request", f"resources.{name}")
