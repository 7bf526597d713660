"""Rules for ``method.type = "reinforcement"`` jobs: the grader, the hyperparameters, and the data it reads.

Everything is checked when the job is created, so a grader that cannot run, or a training line
that lacks a field the grader reads as ``{{item.<field>}}``, is a 400 naming the field (and the line
number) instead of a job that fails later on a GPU. The files are read synchronously from the object
store, one line at a time, only for the ``item`` paths the grader's templates use.
"""

from __future__ import annotations

from service.datasets.validation import _chunks, _Invalid, _lines, _parse_line
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.graders import GraderInvalid, grader_texts, validate_grader
from service.graders.templates import InvalidVariable, item_paths, lookup
from service.graders.types import Grader
from service.jobs.spec import JobCreate, LoraTraining, ReinforcementHyperparameters
from service.model_registry import is_base_model
from service.settings import Settings
from service.storage import ObjectStore

PARAM = "method.reinforcement"
GRADER_PARAM = f"{PARAM}.grader"
HP_PARAM = f"{PARAM}.hyperparameters"


def check_grader(grader: Grader, settings: Settings, param_root: str) -> None:
    """400 ``invalid_grader`` naming the grader's field (``<param_root>.graders.x.operation``)."""
    try:
        validate_grader(grader, model_exists=lambda name: is_base_model(name, settings))
    except GraderInvalid as exc:
        param = f"{param_root}.{exc.param}" if exc.param else param_root
        raise APIError(400, f"{param}: {exc.message}", code="invalid_grader", param=param) from None


def validate_reinforcement(repo: OrgRepository, settings: Settings, spec: JobCreate, store: ObjectStore) -> None:
    body = spec.method.reinforcement
    if body is None:
        raise APIError(400, "a reinforcement job needs method.reinforcement.grader (OpenAI's grader object)",
                       code="invalid_request", param=GRADER_PARAM)
    check_grader(body.grader, settings, GRADER_PARAM)
    hp = body.hyperparameters
    _check_hyperparameters(hp, spec)
    for param in ("training_file", "validation_file"):
        file_id = getattr(spec, param)
        if file_id:
            check_item_fields(repo, store, settings, body.grader, file_id, param)


def _check_hyperparameters(hp: ReinforcementHyperparameters, spec: JobCreate) -> None:
    if hp.max_length <= hp.max_new_tokens:
        raise APIError(400, f"max_length ({hp.max_length}) must exceed max_new_tokens ({hp.max_new_tokens}): "
                       "prompts get max_length - max_new_tokens tokens", code="invalid_request",
                       param=f"{HP_PARAM}.max_length")
    if hp.epsilon_high is not None and hp.epsilon_high < hp.epsilon:
        raise APIError(400, f"epsilon_high ({hp.epsilon_high}) must be at least epsilon ({hp.epsilon})",
                       code="invalid_request", param=f"{HP_PARAM}.epsilon_high")
    if not isinstance(spec.training_type, LoraTraining):
        raise APIError(400, "reinforcement fine-tuning trains LoRA adapters (the policy, the KL reference with "
                       "the adapters disabled and, for 'ppo', the value function share one frozen base); "
                       "training_type 'full' is not supported", code="invalid_request", param="training_type")


def check_item_fields(repo: OrgRepository, store: ObjectStore, settings: Settings, grader: Grader, file_id: str,
                      param: str) -> None:
    """Every ``{{item.<path>}}`` the grader uses must resolve in every line of the file."""
    variables = item_paths(grader_texts(grader))
    if not variables:
        return
    row = repo.get_file(file_id, param)
    limits = settings.limits
    for number, raw, _ in _lines(_chunks(store.iter_chunks(row.storage_key)), limits.max_line_bytes):
        if raw is None:
            continue  # validation at upload already refused this file
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            line = _parse_line(raw, limits.max_json_depth, 0)
        except _Invalid:
            continue
        for variable in variables:
            try:
                lookup(line, variable.path, variable.text)
            except InvalidVariable as exc:
                raise APIError(400, f"{param} '{file_id}' line {number} has no {variable.text}, which the grader "
                               f"reads ({exc}); every line needs the fields the grader's templates name",
                               code="missing_item_field", param=param) from None
