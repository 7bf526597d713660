"""``score_model`` and ``label_model`` without the model: prompts, output parsing, and the runner interface.

A worker (or the training recipe, in-process) supplies a :class:`ModelRunner` that turns chat messages
into text with a local alignd model; everything else — rendering the grader's messages, asking for
OpenAI's response format, reading a score or label out of the text, the refusal and parse flags — is
here, torch-free, so the API, the worker and the recipe behave the same and tests need no model.

OpenAI asks its grader model for structured output ``{"result": ..., "steps": [{"description",
"conclusion"}]}``. A local model cannot be forced into a schema, so alignd appends the same request
as a system instruction and parses leniently: the last JSON object with a ``result`` wins, else (for
scores) the last number in the text, else (for labels) the label the text names last. Nothing
parseable is ``model_grader_parse_error``; a text that only declines ("I'm sorry, I can't ...") is
``model_grader_refusal_error``. Either scores 0. A score outside ``range`` is clipped into it
(OpenAI: "the output of the grader will be truncated to the given range").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.graders.templates import render
from service.graders.types import LabelModelGrader, SamplingParams, ScoreModelGrader
from service.graders.validation import part_text

DEFAULT_MAX_COMPLETION_TOKENS = 256
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i can(?:'|no)t|i cannot|i won'?t|i am unable|"
                      r"i'?m unable|as an ai)", re.I)


class PromptTooLong(ValueError):
    """The rendered grader prompt does not fit the grader model's context (``truncated_observation_error``)."""


class ModelGraderParseError(ValueError):
    pass


class ModelGraderRefusal(ValueError):
    pass


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    messages: list[dict[str, str]]
    max_new_tokens: int
    #: None or 0: greedy; otherwise sampled with ``top_p`` and ``seed``
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelRunner(Protocol):
    """Generates one completion for a grader prompt; raises :class:`PromptTooLong` when it cannot fit."""

    def __call__(self, request: GenerationRequest) -> Generation: ...


def response_instruction(grader: ScoreModelGrader | LabelModelGrader) -> str:
    if isinstance(grader, ScoreModelGrader):
        low, high = score_range(grader)
        return ("Respond with only a JSON object of the form "
                '{"steps": [{"description": "...", "conclusion": "..."}], "result": <number>} where result is '
                f"a number from {_fmt(low)} to {_fmt(high)}.")
    labels = ", ".join(json.dumps(label) for label in grader.labels)
    return ("Respond with only a JSON object of the form "
            '{"steps": [{"description": "...", "conclusion": "..."}], "result": "<label>"} where result is '
            f"exactly one of: {labels}.")


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def score_range(grader: ScoreModelGrader) -> tuple[float, float]:
    bounds = grader.range or [0.0, 1.0]
    return float(bounds[0]), float(bounds[1])


def render_messages(grader: ScoreModelGrader | LabelModelGrader, sample: dict[str, Any],
                    item: Any) -> list[dict[str, str]]:
    """The grader's messages with templates filled in, and OpenAI's response format asked for.

    ``developer`` becomes ``system`` (chat templates of open models know no developer role);
    content parts are joined with newlines. Raises the template errors of :mod:`templates`.
    """
    messages: list[dict[str, str]] = []
    for message in grader.input:
        parts = message.content if isinstance(message.content, list) else [message.content]
        content = "\n".join(render(part_text(part), sample, item) for part in parts)
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    instruction = response_instruction(grader)
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{instruction}"}
    else:
        messages.insert(0, {"role": "system", "content": instruction})
    return messages


def generation_request(grader: ScoreModelGrader | LabelModelGrader, messages: list[dict[str, str]],
                       default_max_tokens: int = DEFAULT_MAX_COMPLETION_TOKENS) -> GenerationRequest:
    params = grader.sampling_params or SamplingParams()
    return GenerationRequest(model=grader.model, messages=messages,
                             max_new_tokens=params.max_completions_tokens or default_max_tokens,
                             temperature=params.temperature, top_p=params.top_p, seed=params.seed)


def _json_results(text: str) -> list[Any]:
    """The ``result`` of every JSON object embedded in the text, in order."""
    found: list[Any] = []
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict) and "result" in value:
            found.append(value["result"])
        start = text.find("{", end)
    return found


def _declined(text: str) -> ValueError:
    if _REFUSAL.match(text.strip()):
        return ModelGraderRefusal(f"the grader model declined: {text.strip()[:200]!r}")
    return ModelGraderParseError(f"no result in the grader model's output: {text.strip()[:200]!r}")


def parse_score(text: str, low: float, high: float) -> float:
    """The grader model's score, clipped into [low, high]."""
    candidates: list[float] = []
    for value in _json_results(text):
        if isinstance(value, int | float) and not isinstance(value, bool):
            candidates.append(float(value))
        elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            candidates.append(float(value.strip()))
    if not candidates:
        candidates = [float(m.group(0)) for m in _NUMBER.finditer(text)]
    candidates = [c for c in candidates if math.isfinite(c)]
    if not candidates:
        raise _declined(text)
    return min(max(candidates[-1], low), high)


def parse_label(text: str, labels: list[str]) -> str:
    """The label the grader model chose: a JSON ``result``, the whole answer, or the label named last."""
    for value in reversed(_json_results(text)):
        if isinstance(value, str):
            for label in labels:
                if value.strip().lower() == label.lower():
                    return label
    stripped = text.strip().strip("\"'`.").strip()
    for label in labels:
        if stripped.lower() == label.lower():
            return label
    best: tuple[int, str] | None = None
    for label in labels:
        for match in re.finditer(rf"(?<!\w){re.escape(label)}(?!\w)", text, re.I):
            if best is None or match.start() > best[0]:
                best = (match.start(), label)
    if best is None:
        raise _declined(text)
    return best[1]
