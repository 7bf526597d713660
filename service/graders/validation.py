"""What a grader must mean, beyond its shape: every fault raises :class:`GraderInvalid` naming the field.

``param`` is relative to the grader (``graders.answer.operation``, ``input[1].content``); the API
prefixes it with where the grader sits in the request (``grader.`` or
``method.reinforcement.grader.``). The same checks run for ``graders/validate``, ``graders/run``
and job creation, so a grader that validates is one that grading can run.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Iterator

from service.graders.formula import Formula, FormulaError
from service.graders.metrics import UNAVAILABLE
from service.graders.templates import TemplateSyntaxError, Variable, variables
from service.graders.types import (
    MAX_SOURCE_BYTES,
    ContentPart,
    Grader,
    InputAudio,
    InputImage,
    InputText,
    LabelModelGrader,
    Message,
    MultiGrader,
    OutputText,
    PythonGrader,
    SamplingParams,
    ScoreModelGrader,
    StringCheckGrader,
    SubGrader,
    TextSimilarityGrader,
)

MAX_MESSAGES = 64
MAX_LABELS = 64
MAX_SUB_GRADERS = 32
MAX_COMPLETION_TOKENS = 4096


class GraderInvalid(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name and not name.startswith("[") else f"{prefix}{name}"


def validate_grader(grader: Grader, *, model_exists: Callable[[str], bool] | None = None) -> None:
    """Raise :class:`GraderInvalid` for the first fault; ``model_exists`` checks model graders' ``model``."""
    if isinstance(grader, MultiGrader):
        _validate_multi(grader, model_exists)
    else:
        _validate_leaf(grader, "", model_exists)


def _validate_multi(grader: MultiGrader, model_exists: Callable[[str], bool] | None) -> None:
    if not grader.graders:
        raise GraderInvalid("a multi grader needs at least one grader in 'graders'", "graders")
    if len(grader.graders) > MAX_SUB_GRADERS:
        raise GraderInvalid(f"a multi grader may combine at most {MAX_SUB_GRADERS} graders", "graders")
    for key, sub in grader.graders.items():
        if not key.strip():
            raise GraderInvalid("grader names in 'graders' must not be empty", "graders")
        _validate_leaf(sub, f"graders.{key}", model_exists)
    try:
        Formula(grader.calculate_output, grader.graders)
    except FormulaError as exc:
        raise GraderInvalid(f"calculate_output: {exc}", "calculate_output") from None


def _validate_leaf(grader: SubGrader, at: str, model_exists: Callable[[str], bool] | None) -> None:
    if isinstance(grader, StringCheckGrader):
        _templates(grader.input, _join(at, "input"))
        _templates(grader.reference, _join(at, "reference"))
    elif isinstance(grader, TextSimilarityGrader):
        _templates(grader.input, _join(at, "input"))
        _templates(grader.reference, _join(at, "reference"))
        if grader.evaluation_metric in UNAVAILABLE:
            raise GraderInvalid(UNAVAILABLE[grader.evaluation_metric], _join(at, "evaluation_metric"))
    elif isinstance(grader, PythonGrader):
        check_python_source(grader.source, _join(at, "source"))
    else:
        _validate_model_grader(grader, at, model_exists)


def _templates(text: str, param: str) -> list[Variable]:
    try:
        return variables(text)
    except TemplateSyntaxError as exc:
        raise GraderInvalid(f"{param}: {exc}", param) from None


def check_python_source(source: str, param: str) -> None:
    """Parse (never run) the source: it must define ``grade(sample, item)`` at the top level."""
    size = len(source.encode("utf-8", "surrogatepass"))
    if size >= MAX_SOURCE_BYTES:
        raise GraderInvalid(f"source is {size} bytes; python graders must be under {MAX_SOURCE_BYTES} bytes "
                            "(OpenAI's 256kB limit)", param)
    try:
        tree = ast.parse(source, filename="grader.py")
    except SyntaxError as exc:
        raise GraderInvalid(f"source does not parse: {exc.msg} (line {exc.lineno}, column {exc.offset})",
                            param) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise GraderInvalid(f"source does not parse: {type(exc).__name__}", param) from None
    grade = None
    defined_otherwise = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "grade":
            grade = node
        elif _binds_grade(node):
            defined_otherwise = True
    if grade is None and not defined_otherwise:
        raise GraderInvalid("source must define a top-level function grade(sample, item) -> float", param)
    if isinstance(grade, ast.AsyncFunctionDef):
        raise GraderInvalid("grade must be a plain function, not async", param)
    if isinstance(grade, ast.FunctionDef):
        args = grade.args
        positional = len(args.posonlyargs) + len(args.args)
        required_kw = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
        optional = len(args.defaults)
        if required_kw or not (positional - optional <= 2 <= positional or (positional < 2 and args.vararg)):
            raise GraderInvalid("grade must take exactly two arguments: grade(sample, item)", param)


def _binds_grade(node: ast.stmt) -> bool:
    """``grade = ...`` or ``from x import grade`` at the top level (a def is checked on its own)."""
    if isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return "grade" in {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return any((alias.asname or alias.name) == "grade" for alias in node.names)
    return False


def _validate_model_grader(grader: ScoreModelGrader | LabelModelGrader, at: str,
                           model_exists: Callable[[str], bool] | None) -> None:
    if model_exists is not None and not model_exists(grader.model):
        raise GraderInvalid(f"model '{grader.model}' is not a base model of this installation; model graders "
                            "run an alignd base model (GET /v1/models lists them)", _join(at, "model"))
    if not grader.input:
        raise GraderInvalid("input needs at least one message", _join(at, "input"))
    if len(grader.input) > MAX_MESSAGES:
        raise GraderInvalid(f"input may have at most {MAX_MESSAGES} messages", _join(at, "input"))
    for param, part in message_parts(grader.input, _join(at, "input")):
        if isinstance(part, InputImage | InputAudio):
            kind = "images" if isinstance(part, InputImage) else "audio"
            raise GraderInvalid(f"alignd's model graders read text only; {kind} cannot be graded", param)
        _templates(part if isinstance(part, str) else part.text, param)
    if isinstance(grader, ScoreModelGrader):
        bounds = grader.range
        if bounds is not None and (len(bounds) != 2 or not all(math.isfinite(b) for b in bounds)
                                   or bounds[0] >= bounds[1]):
            raise GraderInvalid("range must be two finite numbers [low, high] with low < high", _join(at, "range"))
    else:
        _validate_labels(grader, at)
    if grader.sampling_params is not None:
        _validate_sampling(grader.sampling_params, _join(at, "sampling_params"))


def _validate_labels(grader: LabelModelGrader, at: str) -> None:
    labels = grader.labels
    if not labels:
        raise GraderInvalid("labels needs at least one label", _join(at, "labels"))
    if len(labels) > MAX_LABELS:
        raise GraderInvalid(f"at most {MAX_LABELS} labels", _join(at, "labels"))
    if any(not label.strip() for label in labels):
        raise GraderInvalid("labels must not be empty strings", _join(at, "labels"))
    if len(set(labels)) != len(labels):
        raise GraderInvalid("labels must be distinct", _join(at, "labels"))
    if not grader.passing_labels:
        raise GraderInvalid("passing_labels needs at least one label", _join(at, "passing_labels"))
    stray = [p for p in grader.passing_labels if p not in labels]
    if stray:
        raise GraderInvalid(f"passing_labels must be a subset of labels; '{stray[0]}' is not a label",
                            _join(at, "passing_labels"))


def _validate_sampling(params: SamplingParams, at: str) -> None:
    if params.temperature is not None and not 0.0 <= params.temperature <= 2.0:
        raise GraderInvalid("temperature must be between 0 and 2", _join(at, "temperature"))
    if params.top_p is not None and not 0.0 < params.top_p <= 1.0:
        raise GraderInvalid("top_p must be in (0, 1]", _join(at, "top_p"))
    tokens = params.max_completions_tokens
    if tokens is not None and not 1 <= tokens <= MAX_COMPLETION_TOKENS:
        raise GraderInvalid(f"max_completions_tokens must be between 1 and {MAX_COMPLETION_TOKENS}",
                            _join(at, "max_completions_tokens"))
    if params.seed is not None and not 0 <= params.seed < 2**63:
        raise GraderInvalid("seed must be a non-negative 64-bit integer", _join(at, "seed"))


def message_parts(messages: list[Message], at: str) -> Iterator[tuple[str, str | ContentPart]]:
    """Each text string or content part of the messages, with its param path."""
    for index, message in enumerate(messages):
        where = f"{at}[{index}].content"
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                yield f"{where}[{j}]", part
        else:
            yield where, content


def part_text(part: str | ContentPart) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, InputText | OutputText):
        return part.text
    raise ValueError("not a text part")


def grader_texts(grader: Grader) -> list[str]:
    """Every template string in the grader (multi included), for finding the ``item`` fields it reads."""
    texts: list[str] = []
    subs: list[SubGrader] = list(grader.graders.values()) if isinstance(grader, MultiGrader) else [grader]
    for sub in subs:
        if isinstance(sub, StringCheckGrader | TextSimilarityGrader):
            texts += [sub.input, sub.reference]
        elif isinstance(sub, ScoreModelGrader | LabelModelGrader):
            texts += [part_text(p) for _, p in message_parts(sub.input, "")
                      if isinstance(p, str | InputText | OutputText)]
    return texts
