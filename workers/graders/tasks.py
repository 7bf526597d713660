"""The ``alignd.grade`` task: the API's ``graders/run`` for graders that need a model (see service.grader_runs).

Unlike ``alignd.train`` it carries its inputs (a grader, one sample, one item: a bounded JSON request)
and returns the result through the result backend; nothing is stored in the database. It is not
acked late: if the worker dies mid-grade, the caller has already given up, so a redelivery would
grade for nobody.
"""

from __future__ import annotations

from typing import Any

from service.queue import GRADE_TASK
from workers.celery_app import app, settings


@app.task(name=GRADE_TASK, acks_late=False, ignore_result=False, track_started=True)
def grade_sample(grader: dict[str, Any], model_sample: str, item: Any = None) -> dict[str, Any]:
    from workers.graders.model_graders import run_model_grader

    return run_model_grader(grader, model_sample, item if item is not None else {}, settings)
