"""The result of grading one sample, in the exact shape of OpenAI's ``graders/run`` response.

``{reward, metadata: {name, type, errors: {...every OpenAI flag...}, execution_time, scores,
token_usage, sampled_model_name}, sub_rewards, model_grader_token_usage_per_model}``. A grader that
fails scores 0 with the matching flag set; nothing here raises out of grading.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct

#: the detail strings are bounded: they travel in events, responses and task results
MAX_DETAILS = 2000


class GraderErrors(Struct, kw_only=True):
    """OpenAI's ``metadata.errors``: every flag, all false when the grader ran cleanly."""

    formula_parse_error: bool = False
    invalid_variable_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_server_error: bool = False
    model_grader_server_error_details: str | None = None
    other_error: bool = False
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False

    @property
    def any(self) -> bool:
        return any(value is True for value in msgspec.structs.astuple(self))

    def flags(self) -> list[str]:
        """The names of the flags that are set (for events and logs)."""
        return [f for f in self.__struct_fields__ if getattr(self, f) is True]

    def merge(self, other: GraderErrors, prefix: str) -> None:
        """OR ``other``'s flags into these; its detail strings are kept, prefixed with the sub-grader's name."""
        for field in self.__struct_fields__:
            value = getattr(other, field)
            if value is True:
                setattr(self, field, True)
            elif isinstance(value, str):
                mine = getattr(self, field)
                text = f"{prefix}: {value}"
                setattr(self, field, clip(f"{mine}; {text}" if mine else text))


class GradeMetadata(Struct, kw_only=True):
    name: str
    type: str
    errors: GraderErrors
    execution_time: float = 0.0
    scores: dict[str, Any] = msgspec.field(default_factory=dict)
    token_usage: dict[str, int] | None = None
    sampled_model_name: str | None = None


class GradeResult(Struct, kw_only=True):
    reward: float
    metadata: GradeMetadata
    sub_rewards: dict[str, Any] = msgspec.field(default_factory=dict)
    model_grader_token_usage_per_model: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def errors(self) -> GraderErrors:
        return self.metadata.errors

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of OpenAI's ``graders/run`` response."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradeResult:
        return msgspec.convert(data, cls)


def clip(text: str, limit: int = MAX_DETAILS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's token usage object (no prompt cache here, so ``cached_tokens`` is 0)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "cached_tokens": 0}


def add_usage(total: dict[str, int] | None, more: dict[str, int] | None) -> dict[str, int] | None:
    if more is None:
        return total
    if total is None:
        return dict(more)
    return {key: total.get(key, 0) + more.get(key, 0) for key in {*total, *more}}


def error_summary(results: list[GradeResult]) -> dict[str, Any] | None:
    """What went wrong in a batch, for one job event: counts per flag and the first details; None if nothing.

    ``{"samples": 64, "failed": 3, "flags": {"python_grader_runtime_error": 3}, "details": "ZeroDivisionError..."}``
    """
    flags: dict[str, int] = {}
    details: str | None = None
    failed = 0
    for result in results:
        set_flags = result.errors.flags()
        failed += bool(set_flags)
        for flag in set_flags:
            flags[flag] = flags.get(flag, 0) + 1
        errors = result.errors
        details = details or errors.python_grader_runtime_error_details or errors.model_grader_server_error_details \
            or errors.python_grader_server_error_type
    if not failed:
        return None
    return {"samples": len(results), "failed": failed, "flags": flags,
            "details": clip(details, 500) if details else None}
