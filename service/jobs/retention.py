"""Create-time rules for a DPO job's retention probe (``retention_file`` + ``retention_grader``).

The probe runs at every evaluation (``workers.retention``), so it needs a ``validation_file``; its
file must be a processed reinforcement-format (or prompts) file, and every line must hold each
``{{item.<field>}}`` the grader reads — a 400 naming the line and the field, as for reinforcement
jobs (``service.jobs.reinforcement.check_item_fields``), rather than a job that fails mid-training.
Model graders are refused: a DPO worker keeps no judge model loaded.
"""

from __future__ import annotations

from service.datasets.validation import DatasetKind
from service.db.repositories import OrgRepository
from service.errors import APIError
from service.graders import uses_model
from service.jobs.reinforcement import check_grader, check_item_fields
from service.jobs.spec import DpoHyperparameters, JobCreate
from service.settings import Settings
from service.storage import ObjectStore

HP_PARAM = "method.dpo.hyperparameters"
PROBE_KINDS = frozenset({DatasetKind.REINFORCEMENT.value, DatasetKind.PROMPTS.value})


def validate_retention(repo: OrgRepository, settings: Settings, spec: JobCreate, store: ObjectStore) -> None:
    hp = spec.method.hyperparameters()
    if not isinstance(hp, DpoHyperparameters) or (hp.retention_file is None and hp.retention_grader is None):
        return
    file_param, grader_param = f"{HP_PARAM}.retention_file", f"{HP_PARAM}.retention_grader"
    if hp.retention_file is None or hp.retention_grader is None:
        missing = file_param if hp.retention_file is None else grader_param
        raise APIError(400, f"{missing} is required: retention_file and retention_grader go together",
                       code="invalid_request", param=missing)
    if not spec.validation_file:
        raise APIError(400, f"{file_param} needs a validation_file: the retention probe runs at each evaluation",
                       code="invalid_request", param="validation_file")
    check_grader(hp.retention_grader, settings, grader_param)
    if uses_model(hp.retention_grader):
        raise APIError(400, f"{grader_param}: model graders are not supported for the retention probe "
                       "(use string_check, text_similarity or python)", code="invalid_grader", param=grader_param)
    row = repo.get_file(hp.retention_file, file_param)
    if row.status != "processed" or row.kind not in PROBE_KINDS:
        raise APIError(400, f"{file_param} '{hp.retention_file}' must be a processed reinforcement-format file "
                       f"(messages ending in a user turn), not {row.kind or row.status}",
                       code="invalid_file_format", param=file_param)
    check_item_fields(repo, store, settings, hp.retention_grader, hp.retention_file, file_param)
