"""The entry point for graders: ``grade(grader, sample, item) -> GradeResult``, and its batch form.

Both the API (``graders/run``) and the training recipes call these. ``grade`` never raises: a
grader that fails — a template variable that does not resolve, a python grader that throws, loops
or breaks a sandbox limit, a model grader whose output cannot be parsed, a formula that divides
by zero — scores the sample 0.0 with OpenAI's matching error flag in ``metadata.errors``.

Model graders need a model: pass ``model_runner`` (a worker's, or the recipe's own). Without one,
a ``score_model``/``label_model`` scores 0 with ``model_grader_server_error``; the API therefore
sends graders that use a model to a worker (see :func:`service.graders.types.uses_model`).

``grade_batch`` grades many samples concurrently in threads (python graders run in separate
sandbox processes, so threads overlap them fully), each with ``per_sample_timeout`` and all
within ``batch_timeout``: a sample still waiting when the batch deadline passes scores 0 with
``unresponsive_reward_error`` instead of holding up the training step. A recipe that wants grading
to overlap generation submits ``grade_batch`` to its own executor and collects the future later.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from service.graders.formula import Formula, FormulaError, FormulaRuntimeError
from service.graders.metrics import similarity
from service.graders.model_graders import (
    ModelGraderParseError,
    ModelGraderRefusal,
    ModelRunner,
    PromptTooLong,
    generation_request,
    parse_label,
    parse_score,
    render_messages,
    score_range,
)
from service.graders.results import GradeMetadata, GraderErrors, GradeResult, add_usage, clip, usage
from service.graders.sandbox import Sandbox
from service.graders.templates import InvalidVariable, SampleParseError, TemplateSyntaxError, render
from service.graders.types import (
    Grader,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    SubGrader,
    TextSimilarityGrader,
)

log = logging.getLogger("alignd.graders")

DEFAULT_SAMPLE_TIMEOUT = 120.0
_DEFAULT_SANDBOX: Sandbox | None = None

SampleLike = str | dict[str, Any]


def default_sandbox() -> Sandbox:
    global _DEFAULT_SANDBOX
    if _DEFAULT_SANDBOX is None:
        _DEFAULT_SANDBOX = Sandbox()
    return _DEFAULT_SANDBOX


def make_sample(output_text: str, *, finish_reason: str = "stop",
                output_tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """OpenAI's ``sample`` namespace for one completion.

    ``output_json`` is the parsed text when it is a JSON object or array (OpenAI: "populated if the
    model sample is a valid JSON string"), else None; ``choices`` has the chat-completions shape.
    """
    try:
        parsed = json.loads(output_text)
        output_json = parsed if isinstance(parsed, dict | list) else None
    except (ValueError, RecursionError):
        output_json = None
    message: dict[str, Any] = {"role": "assistant", "content": output_text}
    if output_tools:
        message["tool_calls"] = output_tools
    return {"output_text": output_text, "output_json": output_json, "output_tools": output_tools or [],
            "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}], "output_audio": None}


def as_sample(sample: SampleLike) -> dict[str, Any]:
    if isinstance(sample, str):
        return make_sample(sample)
    if isinstance(sample, dict) and isinstance(sample.get("output_text"), str):
        full = make_sample(sample["output_text"])
        full.update(sample)
        return full
    raise TypeError("a sample is the model's output text or a dict with 'output_text'")


def parse_grader(data: Grader | dict[str, Any]) -> Grader:
    """A grader object from its JSON form (raises msgspec.ValidationError on a bad shape)."""
    if isinstance(data, dict):
        return msgspec.convert(data, Grader)  # type: ignore[arg-type]
    return data


def grade(grader: Grader | dict[str, Any], sample: SampleLike, item: Any = None, *,
          model_runner: ModelRunner | None = None, sandbox: Sandbox | None = None,
          timeout: float | None = DEFAULT_SAMPLE_TIMEOUT) -> GradeResult:
    """Grade one sample against its dataset item; never raises (failures are flagged, reward 0)."""
    started = time.monotonic()
    deadline = started + timeout if timeout is not None else None
    try:
        parsed = parse_grader(grader)
    except (msgspec.ValidationError, TypeError) as exc:
        errors = GraderErrors(other_error=True)
        name = grader.get("name") if isinstance(grader, dict) else None
        kind = grader.get("type") if isinstance(grader, dict) else None
        log.warning("grading with an invalid grader: %s", exc)
        return _result(0.0, str(name or kind or "grader"), str(kind or "unknown"), errors, started)
    try:
        full_sample = as_sample(sample)
    except TypeError:
        return _result(0.0, parsed.display_name, parsed.kind, GraderErrors(sample_parse_error=True), started)
    context = _Context(full_sample, item if item is not None else {}, model_runner, sandbox, deadline)
    if isinstance(parsed, MultiGrader):
        return _grade_multi(parsed, context, started)
    return _grade_leaf(parsed, context, started)


def grade_batch(grader: Grader | dict[str, Any], samples: Sequence[SampleLike], items: Sequence[Any], *,
                per_sample_timeout: float = DEFAULT_SAMPLE_TIMEOUT, batch_timeout: float | None = None,
                max_workers: int = 8, model_runner: ModelRunner | None = None,
                sandbox: Sandbox | None = None) -> list[GradeResult]:
    """Grade ``samples[i]`` against ``items[i]`` concurrently; results in input order."""
    if len(samples) != len(items):
        raise ValueError(f"{len(samples)} samples but {len(items)} items")
    parsed: Grader | dict[str, Any]
    try:
        parsed = parse_grader(grader)
    except (msgspec.ValidationError, TypeError):
        parsed = grader
    batch_deadline = time.monotonic() + batch_timeout if batch_timeout is not None else None

    def one(index: int) -> GradeResult:
        budget = per_sample_timeout
        if batch_deadline is not None:
            budget = min(budget, batch_deadline - time.monotonic())
            if budget <= 0:
                return _late(parsed)
        return grade(parsed, samples[index], items[index], model_runner=model_runner, sandbox=sandbox,
                     timeout=budget)

    if not samples:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(samples))),
                            thread_name_prefix="alignd-grade") as pool:
        return list(pool.map(one, range(len(samples))))


def _late(grader: Grader | dict[str, Any]) -> GradeResult:
    kind = grader.kind if not isinstance(grader, dict) else str(grader.get("type", "unknown"))
    name = grader.display_name if not isinstance(grader, dict) else str(grader.get("name") or kind)
    return _result(0.0, name, kind, GraderErrors(unresponsive_reward_error=True), time.monotonic())


class _Context:
    def __init__(self, sample: dict[str, Any], item: Any, model_runner: ModelRunner | None,
                 sandbox: Sandbox | None, deadline: float | None) -> None:
        self.sample = sample
        self.item = item
        self.model_runner = model_runner
        self.sandbox = sandbox
        self.deadline = deadline

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def _result(reward: float, name: str, kind: str, errors: GraderErrors, started: float, **extra: Any) -> GradeResult:
    usage_per_model = extra.pop("usage_per_model", {})
    sub_rewards = extra.pop("sub_rewards", {})
    metadata = GradeMetadata(name=name, type=kind, errors=errors, execution_time=time.monotonic() - started,
                             **extra)
    return GradeResult(reward=0.0 if errors.any else reward, metadata=metadata, sub_rewards=sub_rewards,
                       model_grader_token_usage_per_model=usage_per_model)


def _grade_multi(grader: MultiGrader, context: _Context, started: float) -> GradeResult:
    errors = GraderErrors()
    try:
        formula: Formula | None = Formula(grader.calculate_output, grader.graders)
    except FormulaError:
        formula = None
        errors.formula_parse_error = True
    rewards: dict[str, float] = {}
    usage_total: dict[str, int] | None = None
    per_model: dict[str, dict[str, int]] = {}
    sampled: str | None = None
    for key, sub in grader.graders.items():
        result = _grade_leaf(sub, context, time.monotonic())
        rewards[key] = result.reward
        errors.merge(result.errors, key)
        usage_total = add_usage(usage_total, result.metadata.token_usage)
        for model, used in result.model_grader_token_usage_per_model.items():
            per_model[model] = add_usage(per_model.get(model), used) or {}
        sampled = sampled or result.metadata.sampled_model_name
    reward = 0.0
    if formula is not None and not errors.any:
        try:
            reward = formula.evaluate(rewards)
        except (FormulaRuntimeError, FormulaError) as exc:
            log.info("multi grader %s: %s", grader.display_name, exc)
            errors.other_error = True
    return _result(reward, grader.display_name, grader.kind, errors, started, scores=dict(rewards),
                   sub_rewards=dict(rewards), token_usage=usage_total, sampled_model_name=sampled,
                   usage_per_model=per_model)


def _grade_leaf(grader: SubGrader, context: _Context, started: float) -> GradeResult:
    errors = GraderErrors()
    name, kind = grader.display_name, grader.kind
    try:
        if isinstance(grader, StringCheckGrader):
            return _result(_string_check(grader, context), name, kind, errors, started)
        if isinstance(grader, TextSimilarityGrader):
            value = similarity(grader.evaluation_metric, render(grader.input, context.sample, context.item),
                               render(grader.reference, context.sample, context.item))
            return _result(value, name, kind, errors, started)
        if isinstance(grader, PythonGrader):
            return _python(grader, context, started)
        return _model(grader, context, started)
    except InvalidVariable:
        errors.invalid_variable_error = True
    except SampleParseError:
        errors.sample_parse_error = True
    except TemplateSyntaxError:
        errors.invalid_variable_error = True
    except Exception:  # noqa: BLE001 - a grader must never take the caller down
        log.exception("grader %s (%s) failed", name, kind)
        errors.other_error = True
    return _result(0.0, name, kind, errors, started)


def _string_check(grader: StringCheckGrader, context: _Context) -> float:
    text = render(grader.input, context.sample, context.item)
    reference = render(grader.reference, context.sample, context.item)
    checks: dict[str, Callable[[str, str], bool]] = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "like": lambda a, b: b in a,
        "ilike": lambda a, b: b.casefold() in a.casefold(),
    }
    return 1.0 if checks[grader.operation](text, reference) else 0.0


def _python(grader: PythonGrader, context: _Context, started: float) -> GradeResult:
    errors = GraderErrors()
    left = context.time_left()
    if left is not None and left <= 0:
        errors.unresponsive_reward_error = True
        return _result(0.0, grader.display_name, grader.kind, errors, started)
    outcome = (context.sandbox or default_sandbox()).run(grader.source, context.sample, context.item, timeout=left)
    if outcome.error is None and outcome.reward is not None:
        return _result(outcome.reward, grader.display_name, grader.kind, errors, started)
    if outcome.error == "timeout":
        errors.unresponsive_reward_error = True
        errors.python_grader_runtime_error_details = clip(outcome.details or "timed out")
    elif outcome.error == "server":
        errors.python_grader_server_error = True
        errors.python_grader_server_error_type = outcome.server_error_type or "sandbox_error"
    else:
        errors.python_grader_runtime_error = True
        errors.python_grader_runtime_error_details = clip(outcome.details or "the grader failed")
    return _result(0.0, grader.display_name, grader.kind, errors, started)


def _model(grader: ScoreModelGrader | LabelModelGrader, context: _Context, started: float) -> GradeResult:
    errors = GraderErrors()
    name, kind = grader.display_name, grader.kind
    if context.model_runner is None:
        errors.model_grader_server_error = True
        errors.model_grader_server_error_details = "no model runner here: model graders run on a worker"
        return _result(0.0, name, kind, errors, started)
    messages = render_messages(grader, context.sample, context.item)
    try:
        generation = context.model_runner(generation_request(grader, messages))
    except PromptTooLong as exc:
        errors.truncated_observation_error = True
        errors.model_grader_server_error_details = clip(str(exc))
        return _result(0.0, name, kind, errors, started, sampled_model_name=grader.model)
    except Exception as exc:  # noqa: BLE001 - the model failing is a flagged sample, not a crash
        log.exception("model grader %s failed", name)
        errors.model_grader_server_error = True
        errors.model_grader_server_error_details = clip(f"{type(exc).__name__}: {exc}")
        return _result(0.0, name, kind, errors, started, sampled_model_name=grader.model)
    used = usage(generation.prompt_tokens, generation.completion_tokens)
    extra: dict[str, Any] = {"token_usage": used, "sampled_model_name": generation.model,
                             "usage_per_model": {generation.model: used}}
    try:
        if isinstance(grader, ScoreModelGrader):
            low, high = score_range(grader)
            reward = parse_score(generation.text, low, high)
            return _result(reward, name, kind, errors, started, **extra)
        label = parse_label(generation.text, grader.labels)
        reward = 1.0 if label in grader.passing_labels else 0.0
        return _result(reward, name, kind, errors, started, scores={"label": label}, **extra)
    except ModelGraderRefusal:
        errors.model_grader_refusal_error = True
    except ModelGraderParseError:
        errors.model_grader_parse_error = True
    return _result(0.0, name, kind, errors, started, **extra)
