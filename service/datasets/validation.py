"""Validation of uploaded JSONL training files.

An upload is checked once, when it arrives, so that a job fails in the API with a message that
names the bad lines instead of minutes later inside a worker. The checks here are the contract the
recipes' data loaders rely on: a file that passes holds one format only, every line is a complete
example of that format, and the loaders never need to second-guess roles, types or empty turns.

Formats (one JSON object a line; blank lines are ignored):

- ``supervised``: ``{"messages": [...]}`` ending with an assistant turn (``messages`` variant) or
  ``{"prompt": str, "completion": str}`` (``prompt_completion``).
- ``preference``: OpenAI's ``{"input": {"messages": [...]}, "preferred_output": [msg],
  "non_preferred_output": [msg]}`` (``openai_preference``) or TRL's ``{"prompt", "chosen",
  "rejected"}`` with strings or message lists, ``prompt`` optional for conversations that share a
  prefix (``trl_preference``). An optional numeric ``margin`` is allowed, and numeric
  ``chosen_score``/``rejected_score`` (a judge's scores, as ``generate_preferences`` writes them).
- ``prompts`` (PPO): ``{"messages": [...]}`` ending with a user turn (``messages``) or
  ``{"prompt": str}`` (``prompt``).
- ``reinforcement`` (OpenAI's RFT lines): ``{"messages": [...]}`` ending with a user turn plus any
  extra top-level fields, which graders read as ``{{item.<field>}}``; OpenAI's ``developer`` role is
  allowed in these conversations (a recipe renders it as ``system``). A file may mix such lines
  with plain ``messages`` prompts (a line that needs no reference data); it is then a
  reinforcement file.

Every line may also carry ``id`` and ``metadata``; any other top-level key is rejected (except in a
reinforcement line) so a typo (``"complet"``) is caught instead of silently training on nothing.

The validator is pure standard library (the API image must stay small) and streams its input: it
holds at most one line (bounded by ``max_line_bytes``) in memory and never raises on bad input,
however hostile; everything wrong with the file becomes a :class:`LineError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, BinaryIO, NoReturn

MAX_REPORTED_ERRORS = 20
"""Errors kept with their message; the rest are only counted (a report must stay readable)."""

_CHUNK_BYTES = 1 << 16
_ROLES = ("system", "user", "assistant")
_PROMPT_ROLES = ("system", "developer", "user", "assistant")
_COMMON_KEYS = frozenset({"id", "metadata"})
_OPENAI_PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
_TRL_PREFERENCE_KEYS = frozenset({"chosen", "rejected"})
_EXPECTED_FORMATS = (
    "messages, prompt/completion, prompt, prompt/chosen/rejected "
    "or input/preferred_output/non_preferred_output"
)


class DatasetKind(StrEnum):
    """What a file can train: one kind per file, matched against the job's method."""

    SUPERVISED = "supervised"
    PREFERENCE = "preference"
    PROMPTS = "prompts"
    REINFORCEMENT = "reinforcement"


# Per-side judge scores a preference line may keep (``generate_preferences`` writes them).
_SCORE_KEYS = frozenset({"chosen_score", "rejected_score"})
# Allowed top-level keys per variant; ``margin`` is the reward-model margin of a preference pair.
_VARIANT_KEYS: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}) | _COMMON_KEYS,
    "prompt_completion": frozenset({"prompt", "completion"}) | _COMMON_KEYS,
    "prompt": frozenset({"prompt"}) | _COMMON_KEYS,
    "openai_preference": _OPENAI_PREFERENCE_KEYS | {"margin"} | _SCORE_KEYS | _COMMON_KEYS,
    "trl_preference": _TRL_PREFERENCE_KEYS | {"prompt", "margin"} | _SCORE_KEYS | _COMMON_KEYS,
}

_METHOD_KINDS: dict[str, frozenset[DatasetKind]] = {
    "supervised": frozenset({DatasetKind.SUPERVISED}),
    "dpo": frozenset({DatasetKind.PREFERENCE}),
    "reward_model": frozenset({DatasetKind.PREFERENCE}),
    "ppo": frozenset({DatasetKind.PROMPTS}),
    "generate_preferences": frozenset({DatasetKind.PROMPTS}),
    "reinforcement": frozenset({DatasetKind.REINFORCEMENT, DatasetKind.PROMPTS}),
}


@dataclass
class LineError:
    """One bad line: ``kind`` is a stable machine code, ``message`` names the field path."""

    line: int
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "message": self.message}


@dataclass
class ValidationReport:
    """The outcome of validating one file; ``status_details`` is what the file object shows."""

    kind: DatasetKind | None = None
    variant: str | None = None
    n_lines: int = 0
    n_examples: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_counts: dict[str, int] = field(default_factory=dict)
    n_errors: int = 0
    multi_turn_examples: int = 0

    @property
    def ok(self) -> bool:
        """A file is usable only when every line is valid and there is something to train on."""
        return self.n_errors == 0 and self.n_examples > 0

    def status_details(self) -> str | None:
        """A short, human-readable explanation for the file object's ``status_details``.

        Counts come first because with many bad lines the user needs the shape of the problem
        (all lines? one kind of mistake?) more than the tenth individual line.
        """
        if self.ok:
            return None
        if self.n_errors == 0:
            return "file has no examples"
        noun = "line" if self.n_errors == 1 else "lines"
        ordered = sorted(self.error_counts.items(), key=lambda item: (-item[1], item[0]))
        by_kind = ", ".join(f"{kind}: {count}" for kind, count in ordered)
        parts = [f"{self.n_errors} invalid {noun} out of {self.n_lines} ({by_kind})."]
        parts.extend(f"line {error.line}: {error.message}" for error in self.errors)
        hidden = self.n_errors - len(self.errors)
        if hidden > 0:
            parts.append(f"... and {hidden} more")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary, stored with the file record."""
        return {
            "ok": self.ok,
            "kind": self.kind.value if self.kind is not None else None,
            "variant": self.variant,
            "n_lines": self.n_lines,
            "n_examples": self.n_examples,
            "n_errors": self.n_errors,
            "error_counts": dict(self.error_counts),
            "multi_turn_examples": self.multi_turn_examples,
            "errors": [error.to_dict() for error in self.errors],
        }

    def _add_error(self, line: int, kind: str, message: str, max_errors: int) -> None:
        self.n_errors += 1
        self.error_counts[kind] = self.error_counts.get(kind, 0) + 1
        if len(self.errors) < max_errors:
            self.errors.append(LineError(line, kind, message))


def compatible_kinds(method_type: str) -> set[DatasetKind]:
    """The dataset kinds a fine-tuning method can train on.

    An unknown method gets an empty set rather than an exception: callers compare a file's kind with
    this set, and an empty set rejects every file as a client error instead of a server error.
    """
    return set(_METHOD_KINDS.get(method_type, frozenset()))


# --- per-example checks ---------------------------------------------------------------------------


class _Invalid(Exception):
    """Raised by the checks below; carries the error code and message for the line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _fail(kind: str, message: str) -> NoReturn:
    raise _Invalid(kind, message)


def _json_type(value: object) -> str:
    """JSON's name for a value's type: users wrote JSON, not Python."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: object, limit: int = 40) -> str:
    """A bounded repr, so a hostile value cannot blow up an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _check_keys(example: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in example:
        if key not in allowed:
            names = ", ".join(sorted(allowed))
            _fail("unknown_field", f"unknown field {_short(key)} in {where} (allowed: {names})")


def _require(example: dict[str, Any], keys: Iterable[str], prefix: str = "") -> None:
    for key in keys:
        if key not in example:
            _fail("missing_field", f"{prefix}{key}: missing field")


def _check_string(value: object, path: str, *, non_empty: bool) -> str:
    if not isinstance(value, str):
        _fail("wrong_type", f"{path}: expected a string, got {_a(_json_type(value))}")
    if non_empty and not value.strip():
        _fail("empty_content", f"{path}: must not be empty")
    return value


def _check_messages(value: object, path: str, *, weights: bool,
                    roles: tuple[str, ...] = _ROLES) -> list[dict[str, Any]]:
    """Check a list of chat messages; only supervised conversations may carry per-turn weights."""
    if not isinstance(value, list):
        _fail("wrong_type", f"{path}: expected an array of messages, got {_a(_json_type(value))}")
    if not value:
        _fail("empty_messages", f"{path}: must contain at least one message")
    allowed = frozenset({"role", "content", "weight"} if weights else {"role", "content"})
    for index, message in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(message, dict):
            _fail("wrong_type", f"{where}: expected a message object, got {_a(_json_type(message))}")
        for key in message:
            if key not in allowed:
                hint = " (weights apply only to supervised examples)" if key == "weight" else ""
                _fail("unknown_field", f"{where}: unknown field {_short(key)}{hint}")
        _require(message, ("role", "content"), f"{where}.")
        role = message["role"]
        if not isinstance(role, str):
            _fail("wrong_type", f"{where}.role: expected a string, got {_a(_json_type(role))}")
        if role not in roles:
            expected = f"expected {', '.join(roles[:-1])} or {roles[-1]}"
            _fail("unknown_role", f"{where}.role: unknown role {_short(role)} ({expected})")
        _check_string(message["content"], f"{where}.content", non_empty=role == "assistant")
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                _fail("invalid_weight", f"{where}.weight: only assistant turns may have a weight")
            if type(weight) is not int or weight not in (0, 1):
                _fail("invalid_weight", f"{where}.weight: must be 0 or 1, got {_short(weight)}")
    return value


def _count_user_turns(messages: list[dict[str, Any]]) -> int:
    return sum(1 for message in messages if message["role"] == "user")


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in messages]


def _check_margin(example: dict[str, Any]) -> None:
    for name in ("margin", *sorted(_SCORE_KEYS)):
        if name in example:
            value = example[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                _fail("wrong_type", f"{name}: expected a number, got {_short(value)}")


def _check_common(example: dict[str, Any]) -> None:
    if "id" in example and not isinstance(example["id"], str | int):
        _fail("wrong_type", f"id: expected a string or number, got {_a(_json_type(example['id']))}")
    if "metadata" in example and not isinstance(example["metadata"], dict):
        _fail("wrong_type", f"metadata: expected an object, got {_a(_json_type(example['metadata']))}")


def _shape(example: dict[str, Any]) -> str | None:
    """Which variant a line is trying to be, from its keys alone.

    Deciding the intended variant before checking it is what lets the errors say "chosen: missing
    field" rather than a vague "matches no format" for a line that is almost right.
    """
    keys = example.keys()
    if keys & _OPENAI_PREFERENCE_KEYS:
        return "openai_preference"
    if keys & _TRL_PREFERENCE_KEYS:
        return "trl_preference"
    if "messages" in keys:
        return "messages"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"
    return None


def _classify(example: dict[str, Any]) -> tuple[DatasetKind, str, int]:
    """Validate one parsed line; returns (kind, variant, user turns) or raises :class:`_Invalid`."""
    variant = _shape(example)
    if variant is None:
        found = ", ".join(_short(key, 30) for key in list(example)[:8]) or "an empty object"
        more = ", ..." if len(example) > 8 else ""
        _fail(
            "unknown_format",
            f"no known format matches the keys found ({found}{more}); expected {_EXPECTED_FORMATS}",
        )
    if variant == "messages":
        _check_common(example)
        return _classify_messages(example)
    _check_keys(example, _VARIANT_KEYS[variant], f"a {variant} example")
    _check_common(example)
    if variant == "prompt_completion":
        _require(example, ("prompt", "completion"))
        _check_string(example["prompt"], "prompt", non_empty=True)
        _check_string(example["completion"], "completion", non_empty=True)
        return DatasetKind.SUPERVISED, variant, 1
    if variant == "prompt":
        _check_string(example["prompt"], "prompt", non_empty=True)
        return DatasetKind.PROMPTS, variant, 1
    _check_margin(example)
    if variant == "openai_preference":
        return DatasetKind.PREFERENCE, variant, _check_openai_preference(example)
    return DatasetKind.PREFERENCE, variant, _check_trl_preference(example)


def _classify_messages(example: dict[str, Any]) -> tuple[DatasetKind, str, int]:
    """A conversation is supervised when it ends with the assistant, a prompt when with the user.

    A prompt line with fields beyond ``messages``/``id``/``metadata`` (or a ``developer`` turn) is an
    OpenAI RFT line: the fields are what its grader reads.
    """
    messages = _check_messages(example["messages"], "messages", weights=True, roles=_PROMPT_ROLES)
    last = len(messages) - 1
    role = messages[last]["role"]
    if role == "assistant":
        _check_keys(example, _VARIANT_KEYS["messages"], "a messages example")
        for index, message in enumerate(messages):
            if message["role"] == "developer":
                _fail("unknown_role", f"messages[{index}].role: unknown role 'developer' in a supervised "
                      "example (expected system, user or assistant)")
        if all(message.get("weight", 1) == 0 for message in messages if message["role"] == "assistant"):
            _fail("invalid_weight", "messages: every assistant turn has weight 0; nothing would be trained")
        return DatasetKind.SUPERVISED, "messages", _count_user_turns(messages)
    if role == "user":
        for index, message in enumerate(messages):
            if "weight" in message:
                _fail(
                    "unknown_field",
                    f"messages[{index}]: unknown field 'weight' (weights apply only to supervised examples; "
                    "a conversation ending with a user turn is a prompt)",
                )
        extra = [key for key in example if key not in _VARIANT_KEYS["messages"]]
        if extra or any(message["role"] == "developer" for message in messages):
            return DatasetKind.REINFORCEMENT, "messages", _count_user_turns(messages)
        return DatasetKind.PROMPTS, "messages", _count_user_turns(messages)
    _fail(
        "wrong_last_turn",
        f"messages[{last}].role: conversation ends with a {role} turn (a supervised example ends with an "
        "assistant turn, a prompt with a user turn)",
    )


def _check_prompt_messages(value: object, path: str) -> list[dict[str, Any]]:
    messages = _check_messages(value, path, weights=False)
    last = len(messages) - 1
    if messages[last]["role"] == "assistant":
        message = f"{path}[{last}].role: a prompt must not end with an assistant turn"
        _fail("prompt_ends_with_assistant", message)
    return messages


def _check_completion_messages(value: object, path: str) -> list[dict[str, Any]]:
    messages = _check_messages(value, path, weights=False)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        role = messages[last]["role"]
        _fail("wrong_last_turn", f"{path}[{last}].role: must end with an assistant turn, not a {role} turn")
    return messages


def _check_openai_output(example: dict[str, Any], name: str) -> str:
    value = example[name]
    if not isinstance(value, list):
        found = _a(_json_type(value))
        _fail("wrong_type", f"{name}: expected an array of one assistant message, got {found}")
    if len(value) > 1:
        _fail("wrong_type", f"{name}: expected exactly one assistant message, got {len(value)}")
    messages = _check_messages(value, name, weights=False)
    role = messages[0]["role"]
    if role != "assistant":
        _fail("wrong_role", f"{name}[0].role: expected 'assistant', got {_short(role)}")
    content: str = messages[0]["content"]
    return content


def _check_openai_preference(example: dict[str, Any]) -> int:
    _require(example, ("input", "preferred_output", "non_preferred_output"))
    prompt = example["input"]
    if not isinstance(prompt, dict):
        _fail("wrong_type", f"input: expected an object with messages, got {_a(_json_type(prompt))}")
    _check_keys(prompt, frozenset({"messages"}), "input")
    _require(prompt, ("messages",), "input.")
    messages = _check_prompt_messages(prompt["messages"], "input.messages")
    preferred = _check_openai_output(example, "preferred_output")
    rejected = _check_openai_output(example, "non_preferred_output")
    if preferred.strip() == rejected.strip():
        _fail("identical_pair", "preferred_output and non_preferred_output are identical")
    return _count_user_turns(messages)


def _check_trl_preference(example: dict[str, Any]) -> int:
    _require(example, ("chosen", "rejected"))
    chosen, rejected = example["chosen"], example["rejected"]
    if "prompt" not in example:
        return _check_implicit_prompt(chosen, rejected)
    prompt = example["prompt"]
    if isinstance(prompt, str):
        _check_string(prompt, "prompt", non_empty=True)
        for name in ("chosen", "rejected"):
            if not isinstance(example[name], str):
                found = _a(_json_type(example[name]))
                _fail("wrong_type", f"{name}: expected a string (prompt is a string), got {found}")
            _check_string(example[name], name, non_empty=True)
        if chosen.strip() == rejected.strip():
            _fail("identical_pair", "chosen and rejected are identical")
        return 1
    if not isinstance(prompt, list):
        found = _a(_json_type(prompt))
        _fail("wrong_type", f"prompt: expected a string or an array of messages, got {found}")
    prompt_messages = _check_prompt_messages(prompt, "prompt")
    for name in ("chosen", "rejected"):
        if not isinstance(example[name], list):
            found = _a(_json_type(example[name]))
            _fail("wrong_type", f"{name}: expected an array of messages (prompt is one), got {found}")
    chosen_messages = _check_completion_messages(chosen, "chosen")
    rejected_messages = _check_completion_messages(rejected, "rejected")
    if _turns(chosen_messages) == _turns(rejected_messages):
        _fail("identical_pair", "chosen and rejected are identical")
    return _count_user_turns(prompt_messages)


def _check_implicit_prompt(chosen: object, rejected: object) -> int:
    """TRL's implicit prompt: two full conversations whose shared prefix is the prompt."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        _fail("missing_field", "prompt: missing field (required when chosen and rejected are strings)")
    chosen_messages = _check_completion_messages(chosen, "chosen")
    rejected_messages = _check_completion_messages(rejected, "rejected")
    chosen_turns, rejected_turns = _turns(chosen_messages), _turns(rejected_messages)
    if chosen_turns == rejected_turns:
        _fail("identical_pair", "chosen and rejected are identical")
    shared = 0
    for left, right in zip(chosen_turns, rejected_turns, strict=False):
        if left != right:
            break
        shared += 1
    if shared == 0:
        _fail(
            "missing_field",
            "prompt: missing field (chosen and rejected share no leading turns to serve as the prompt)",
        )
    if chosen_turns[shared - 1][0] == "assistant":
        _fail(
            "prompt_ends_with_assistant",
            f"chosen[{shared - 1}].role: the prompt chosen and rejected share ends with an assistant turn",
        )
    return _count_user_turns(chosen_messages[:shared])


def detect_kind(example: dict[str, Any]) -> tuple[DatasetKind, str] | None:
    """Classify one parsed line as ``(kind, variant)``, or ``None`` when it is not a valid example.

    Only valid examples are classified, so a loader can trust the answer without re-checking.
    """
    if not isinstance(example, dict):
        return None
    try:
        kind, variant, _ = _classify(example)
    except _Invalid:
        return None
    return kind, variant


# --- reading ----------------------------------------------------------------------------------------


def _chunks(source: BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    """Fixed-size reads from a file, or the caller's chunks as given."""
    read = getattr(source, "read", None)
    if read is not None:
        while chunk := read(_CHUNK_BYTES):
            yield _as_bytes(chunk)
        return
    for chunk in source:
        if chunk:
            yield _as_bytes(chunk)


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, bytes | bytearray):
        return bytes(chunk) if isinstance(chunk, bytearray) else chunk
    if isinstance(chunk, memoryview):
        return chunk.tobytes()
    raise TypeError(f"validate_jsonl reads bytes, got {type(chunk).__name__} (open the file in binary mode)")


def _lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield ``(line number, line or None if too long, length in bytes)`` without the newline.

    A line is buffered only while it is within ``max_line_bytes``; past that its bytes are counted
    and dropped, so memory stays bounded whatever the input.
    """
    buffer = bytearray()
    skipping = False  # inside a line already known to be too long
    skipped = 0
    number = 0
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = (len(chunk) if end == -1 else end) - start
            if skipping:
                skipped += piece
            elif len(buffer) + piece > max_line_bytes:
                skipping, skipped = True, len(buffer) + piece
                buffer = bytearray()
            elif end == -1:
                buffer += chunk[start:]
            if end == -1:
                break
            number += 1
            if skipping:
                yield number, None, skipped
                skipping, skipped = False, 0
            elif buffer:
                buffer += chunk[start:end]
                line, buffer = bytes(buffer), bytearray()
                yield number, line, len(line)
            else:
                yield number, chunk[start:end], piece
            start = end + 1
    if skipping:
        yield number + 1, None, skipped
    elif buffer:
        yield number + 1, bytes(buffer), len(buffer)


class _NonStandardConstant(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    """NaN and Infinity are Python extensions to JSON that other readers of the file would reject."""
    raise _NonStandardConstant(name)


def _too_deep(value: object, limit: int) -> bool:
    """Iterative, so checking depth can never itself hit the recursion limit."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _parse_line(raw: bytes, max_depth: int, offset: int) -> dict[str, Any]:
    """Decode and parse one line, or raise :class:`_Invalid`; ``offset`` maps positions back to the file."""
    nul = raw.find(b"\x00")
    if nul != -1:
        _fail("nul_byte", f"NUL byte at byte offset {nul + offset}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        _fail("invalid_utf8", f"invalid UTF-8 at byte offset {exc.start + offset} (byte 0x{bad:02x})")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        _fail("too_deep", f"nesting deeper than {max_depth} levels")
    except json.JSONDecodeError as exc:
        _fail("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")
    except _NonStandardConstant as exc:
        _fail("invalid_json", f"invalid JSON: {exc} is not a JSON value")
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        _fail("invalid_json", f"invalid JSON: {str(exc)[:120]}")
    # Counting brackets (strings included) bounds the depth from above and is cheap; only lines that
    # could be too deep are walked.
    if raw.count(b"[") + raw.count(b"{") > max_depth and _too_deep(value, max_depth):
        _fail("too_deep", f"nesting deeper than {max_depth} levels")
    if not isinstance(value, dict):
        _fail("wrong_type", f"expected a JSON object, got {_a(_json_type(value))}")
    return value


def _prompt_lines_join(file_kind: DatasetKind, file_variant: str | None, kind: DatasetKind, variant: str) -> bool:
    pair = {file_kind, kind}
    return file_variant == variant == "messages" and pair == {DatasetKind.PROMPTS, DatasetKind.REINFORCEMENT}


def _mixed_message(kind: DatasetKind, variant: str, file_kind: DatasetKind, file_variant: str | None) -> str:
    if kind != file_kind:
        return f"{kind} example ({variant}) in a {file_kind} file ({file_variant}); use one format per file"
    return f"{variant} example in a {file_variant} {file_kind} file; use one format per file"


def validate_jsonl(
    source: BinaryIO | Iterable[bytes],
    *,
    max_line_bytes: int = 4 << 20,
    max_depth: int = 32,
    max_errors: int = MAX_REPORTED_ERRORS,
) -> ValidationReport:
    """Validate a JSONL training file read as a byte stream.

    ``source`` is a binary file (read in fixed-size chunks) or an iterable of byte chunks whose
    boundaries need not fall on line ends. The file's kind is set by its first valid line; a later
    line that is valid but of another kind or variant is a ``mixed_format`` error, because a
    recipe's loader reads one format per file. Each bad line counts once, under its first error.
    """
    report = ValidationReport()
    for number, raw, length in _lines(_chunks(source), max_line_bytes):
        if raw is None:
            report.n_lines += 1
            message = f"line is {length} bytes, over the {max_line_bytes}-byte limit"
            report._add_error(number, "line_too_long", message, max_errors)
            continue
        offset = 0
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
            raw, offset = raw[3:], 3
        if not raw.strip():
            continue
        report.n_lines += 1
        try:
            example = _parse_line(raw, max_depth, offset)
            kind, variant, user_turns = _classify(example)
            if report.kind is None:
                report.kind, report.variant = kind, variant
            elif _prompt_lines_join(report.kind, report.variant, kind, variant):
                # plain prompts and RFT lines mix: the file holds reinforcement data
                report.kind = DatasetKind.REINFORCEMENT
            elif (kind, variant) != (report.kind, report.variant):
                _fail("mixed_format", _mixed_message(kind, variant, report.kind, report.variant))
        except _Invalid as exc:
            report._add_error(number, exc.kind, exc.message, max_errors)
            continue
        report.n_examples += 1
        if user_turns > 1:
            report.multi_turn_examples += 1
    return report
