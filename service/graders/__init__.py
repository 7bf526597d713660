"""Reinforcement fine-tuning graders in OpenAI's shape, torch-free, shared by the API and the workers.

- :mod:`types` — the grader objects (``string_check``, ``text_similarity``, ``python``,
  ``score_model``, ``label_model``, ``multi``) as msgspec Structs with OpenAI's field names.
- :mod:`validation` — what a grader must mean (400s naming the field).
- :mod:`templates`, :mod:`formula`, :mod:`metrics` — ``{{ item.x }}``, ``calculate_output``, similarity.
- :mod:`sandbox` — python graders under bubblewrap, rlimits and an unprivileged uid.
- :mod:`model_graders` — prompts and output parsing for model graders; the model itself is a
  :class:`ModelRunner` that a worker (or the training recipe) provides.
- :mod:`grading` — ``grade`` and ``grade_batch``, the entry points; :mod:`results` their OpenAI shape.
"""

from service.graders.grading import grade, grade_batch, make_sample, parse_grader
from service.graders.model_graders import Generation, GenerationRequest, ModelRunner, PromptTooLong
from service.graders.results import GraderErrors, GradeResult, error_summary
from service.graders.sandbox import Sandbox, SandboxLimits
from service.graders.types import Grader, uses_model, uses_python
from service.graders.validation import GraderInvalid, grader_texts, validate_grader

__all__ = [
    "Generation", "GenerationRequest", "GradeResult", "Grader", "GraderErrors", "GraderInvalid", "ModelRunner",
    "PromptTooLong", "Sandbox", "SandboxLimits", "error_summary", "grade", "grade_batch", "grader_texts",
    "make_sample",
    "parse_grader", "uses_model", "uses_python", "validate_grader",
]
