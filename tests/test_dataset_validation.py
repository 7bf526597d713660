"""Tests for JSONL dataset validation: every malformed case names its line and kind, valid files of each
variant are recognised, and hostile input (huge lines, deep nesting, bad bytes) is reported, never raised.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from service.datasets.validation import (
    MAX_REPORTED_ERRORS,
    DatasetKind,
    LineError,
    ValidationReport,
    compatible_kinds,
    detect_kind,
    validate_jsonl,
)


def user(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


def system(content: str) -> dict[str, Any]:
    return {"role": "system", "content": content}


SFT = {"messages": [system("Be brief."), user("Hi"), assistant("Hello!")]}
SFT_MULTI = {"messages": [user("Hi"), assistant("Hello!", weight=0), user("2+2?"), assistant("4", weight=1)]}
PROMPT_COMPLETION = {"prompt": "The capital of France is", "completion": " Paris."}
OPENAI_PREF = {
    "input": {"messages": [user("Say hi")]},
    "preferred_output": [assistant("Hi!")],
    "non_preferred_output": [assistant("Go away.")],
}
TRL_STRING = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}
TRL_CONVERSATION = {"prompt": [user("Say hi")], "chosen": [assistant("Hi!")], "rejected": [assistant("No.")]}
TRL_IMPLICIT = {
    "chosen": [user("Say hi"), assistant("Hi!")],
    "rejected": [user("Say hi"), assistant("No.")],
}
PPO_MESSAGES = {"messages": [system("Be kind."), user("Tell me a joke")]}
PPO_PROMPT = {"prompt": "Tell me a joke"}


def jsonl(*rows: dict[str, Any] | str | bytes) -> bytes:
    """One line per row: dicts are serialised, str/bytes are taken verbatim (for broken lines)."""
    out = []
    for row in rows:
        if isinstance(row, dict):
            out.append(json.dumps(row).encode())
        elif isinstance(row, str):
            out.append(row.encode())
        else:
            out.append(row)
    return b"\n".join(out) + b"\n"


def validate(data: bytes, **kwargs: Any) -> ValidationReport:
    return validate_jsonl(io.BytesIO(data), **kwargs)


def assert_error(report: ValidationReport, line: int, kind: str) -> LineError:
    """The error is in the report and in status_details, which never holds a traceback."""
    assert not report.ok
    matches = [error for error in report.errors if error.line == line and error.kind == kind]
    assert matches, f"no {kind} error on line {line}: {report.errors}"
    details = report.status_details()
    assert details is not None
    assert f"line {line}: {matches[0].message}" in details
    assert f"{kind}: " in details
    assert "Traceback" not in details
    json.dumps(report.to_dict())
    return matches[0]


# --- valid files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "kind", "variant", "multi_turn"),
    [
        ([SFT, SFT_MULTI, SFT], DatasetKind.SUPERVISED, "messages", 1),
        ([PROMPT_COMPLETION] * 3, DatasetKind.SUPERVISED, "prompt_completion", 0),
        (
            [OPENAI_PREF, {**OPENAI_PREF, "margin": 1.5, "id": "a", "metadata": {"src": "x"}}, OPENAI_PREF],
            DatasetKind.PREFERENCE,
            "openai_preference",
            0,
        ),
        ([TRL_STRING, {**TRL_STRING, "margin": 2}, TRL_STRING], DatasetKind.PREFERENCE, "trl_preference", 0),
        ([TRL_CONVERSATION] * 3, DatasetKind.PREFERENCE, "trl_preference", 0),
        ([TRL_IMPLICIT, TRL_IMPLICIT, TRL_CONVERSATION], DatasetKind.PREFERENCE, "trl_preference", 0),
        (
            [PPO_MESSAGES, {"messages": [user("a"), assistant("b"), user("c")]}, PPO_MESSAGES],
            DatasetKind.PROMPTS,
            "messages",
            1,
        ),
        ([PPO_PROMPT] * 3, DatasetKind.PROMPTS, "prompt", 0),
    ],
)
def test_valid_files_are_detected(
    rows: list[dict[str, Any]], kind: DatasetKind, variant: str, multi_turn: int
) -> None:
    report = validate(jsonl(*rows))
    assert report.ok, report.status_details()
    assert (report.kind, report.variant) == (kind, variant)
    assert (report.n_lines, report.n_examples, report.n_errors) == (3, 3, 0)
    assert report.multi_turn_examples == multi_turn
    assert report.status_details() is None
    assert detect_kind(rows[0]) == (kind, variant)
    summary = report.to_dict()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["kind"] == kind.value and summary["variant"] == variant and summary["errors"] == []


def test_multi_turn_counts_preference_prompts() -> None:
    history = [user("Hi"), assistant("Hello"), user("Say hi again")]
    openai = validate(jsonl(OPENAI_PREF, {**OPENAI_PREF, "input": {"messages": history}}))
    assert openai.ok and openai.multi_turn_examples == 1
    trl = validate(jsonl(TRL_CONVERSATION, {**TRL_CONVERSATION, "prompt": history}))
    assert trl.ok and trl.multi_turn_examples == 1
    implicit = {"chosen": [*history, assistant("Hi!")], "rejected": [*history, assistant("No.")]}
    assert validate(jsonl(implicit)).multi_turn_examples == 1


def test_blank_lines_crlf_bom_and_missing_final_newline() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(SFT).encode() + b"\r\n\r\n   \n" + json.dumps(SFT).encode()
    report = validate(data)
    assert report.ok, report.status_details()
    assert (report.n_lines, report.n_examples) == (2, 2)


def test_blank_lines_keep_physical_line_numbers() -> None:
    report = validate(jsonl(SFT, "", "", "{oops"))
    assert_error(report, 4, "invalid_json")
    assert report.n_lines == 2


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_file_has_no_examples(data: bytes) -> None:
    report = validate(data)
    assert not report.ok
    assert report.kind is None and report.variant is None
    assert report.n_examples == 0 and report.n_errors == 0
    assert report.status_details() == "file has no examples"


def test_file_with_only_bad_lines_has_no_kind() -> None:
    report = validate(jsonl("nope", "[1]"))
    assert report.kind is None and report.n_examples == 0 and report.n_errors == 2


# --- malformed lines: exact line and kind ---------------------------------------------------------


def test_invalid_json_names_column() -> None:
    error = assert_error(validate(jsonl(SFT, '{"messages": [} ')), 2, "invalid_json")
    assert "column" in error.message


def test_non_standard_constants_are_invalid_json() -> None:
    assert_error(
        validate(jsonl(TRL_STRING, '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}')),
        2,
        "invalid_json",
    )


def test_huge_integer_is_invalid_json_not_a_crash() -> None:
    assert_error(validate(jsonl(SFT, '{"id": ' + "9" * 5000 + "}")), 2, "invalid_json")


def test_invalid_utf8_names_byte_offset() -> None:
    error = assert_error(validate(jsonl(SFT, b'{"prompt": "caf\xe9"}')), 2, "invalid_utf8")
    assert "byte offset 15" in error.message


def test_nul_byte() -> None:
    error = assert_error(validate(jsonl(SFT, b'{"prompt": "a\x00b"}')), 2, "nul_byte")
    assert "byte offset 13" in error.message


def test_top_level_array_is_wrong_type() -> None:
    error = assert_error(validate(jsonl(SFT, "[1, 2]", '"text"')), 2, "wrong_type")
    assert "array" in error.message
    assert_error(validate(jsonl(SFT, "[1, 2]", '"text"')), 3, "wrong_type")


@pytest.mark.parametrize(
    ("row", "path"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [user("Hi"), {"role": "assistant", "content": 42}]}, "messages[1].content"),
        ({"messages": [user("Hi"), "hello"]}, "messages[1]"),
        ({"messages": [{"role": 1, "content": "x"}, assistant("y")]}, "messages[0].role"),
        ({"prompt": "a", "completion": None}, "completion"),
        ({**OPENAI_PREF, "input": [user("x")]}, "input"),
        ({**OPENAI_PREF, "preferred_output": [assistant("a"), assistant("b")]}, "preferred_output"),
        ({**OPENAI_PREF, "margin": "high"}, "margin"),
        ({**TRL_STRING, "chosen": [assistant("Hi!")]}, "chosen"),
        ({**TRL_CONVERSATION, "rejected": "No."}, "rejected"),
        ({**TRL_STRING, "prompt": 3}, "prompt"),
        ({**SFT, "metadata": "x"}, "metadata"),
    ],
)
def test_wrong_field_types(row: dict[str, Any], path: str) -> None:
    first = OPENAI_PREF if "input" in row else TRL_STRING if "chosen" in row else SFT
    if row.get("prompt") == "a":
        first = PROMPT_COMPLETION
    error = assert_error(validate(jsonl(first, first, row)), 3, "wrong_type")
    assert error.message.startswith(f"{path}:")


@pytest.mark.parametrize(
    ("first", "row", "field"),
    [
        (TRL_STRING, {"prompt": "a", "chosen": "b"}, "rejected"),
        (
            OPENAI_PREF,
            {"input": OPENAI_PREF["input"], "preferred_output": [assistant("x")]},
            "non_preferred_output",
        ),
        (OPENAI_PREF, {**OPENAI_PREF, "input": {}}, "input.messages"),
        (SFT, {"messages": [user("Hi"), {"role": "assistant"}]}, "messages[1].content"),
        (TRL_STRING, {"chosen": "a", "rejected": "b"}, "prompt"),
        (
            TRL_IMPLICIT,
            {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]},
            "prompt",
        ),
    ],
)
def test_missing_field(first: dict[str, Any], row: dict[str, Any], field: str) -> None:
    error = assert_error(validate(jsonl(first, row)), 2, "missing_field")
    assert error.message.startswith(f"{field}:")


@pytest.mark.parametrize(
    ("first", "row", "name"),
    [
        (SFT, {**SFT, "weight": 1}, "'weight'"),
        (PROMPT_COMPLETION, {"prompt": "a", "complet": "b"}, "'complet'"),
        (PPO_PROMPT, {"prompt": "a", "margin": 1}, "'margin'"),
        (SFT, {"messages": [user("Hi"), assistant("Hello", name="bot")]}, "'name'"),
        (OPENAI_PREF, {**OPENAI_PREF, "input": {"messages": [user("Hi")], "tools": []}}, "'tools'"),
        (OPENAI_PREF, {**OPENAI_PREF, "preferred_output": [assistant("Hi!", weight=1)]}, "'weight'"),
        (PPO_MESSAGES, {"messages": [user("Hi"), assistant("Hello", weight=1), user("Bye")]}, "'weight'"),
    ],
)
def test_unknown_field(first: dict[str, Any], row: dict[str, Any], name: str) -> None:
    error = assert_error(validate(jsonl(first, row)), 2, "unknown_field")
    assert name in error.message


def test_unknown_role_names_path() -> None:
    row = {**OPENAI_PREF, "preferred_output": [{"role": "bot", "content": "Hi!"}]}
    error = assert_error(validate(jsonl(OPENAI_PREF, row)), 2, "unknown_role")
    assert (
        error.message == "preferred_output[0].role: unknown role 'bot' (expected system, user or assistant)"
    )
    error = assert_error(
        validate(jsonl(SFT, {"messages": [{"role": "human", "content": "x"}, assistant("y")]})),
        2,
        "unknown_role",
    )
    assert error.message.startswith("messages[0].role:")


def test_wrong_role_in_openai_output() -> None:
    row = {**OPENAI_PREF, "non_preferred_output": [user("Hi!")]}
    error = assert_error(validate(jsonl(OPENAI_PREF, row)), 2, "wrong_role")
    assert error.message.startswith("non_preferred_output[0].role:")


@pytest.mark.parametrize(
    ("first", "row", "path"),
    [
        (SFT, {"messages": [user("Hi"), assistant("  ")]}, "messages[1].content"),
        (PROMPT_COMPLETION, {"prompt": "a", "completion": ""}, "completion"),
        (PROMPT_COMPLETION, {"prompt": "", "completion": "b"}, "prompt"),
        (PPO_PROMPT, {"prompt": ""}, "prompt"),
        (TRL_STRING, {**TRL_STRING, "chosen": ""}, "chosen"),
        (TRL_CONVERSATION, {**TRL_CONVERSATION, "rejected": [assistant("")]}, "rejected[0].content"),
        (OPENAI_PREF, {**OPENAI_PREF, "preferred_output": [assistant("")]}, "preferred_output[0].content"),
    ],
)
def test_empty_content(first: dict[str, Any], row: dict[str, Any], path: str) -> None:
    error = assert_error(validate(jsonl(first, row)), 2, "empty_content")
    assert error.message.startswith(f"{path}:")


def test_user_and_system_content_may_be_empty() -> None:
    assert validate(jsonl({"messages": [system(""), user(""), assistant("ok")]})).ok


@pytest.mark.parametrize(
    ("first", "row"),
    [
        (SFT, {"messages": []}),
        (OPENAI_PREF, {**OPENAI_PREF, "preferred_output": []}),
        (TRL_CONVERSATION, {**TRL_CONVERSATION, "chosen": []}),
    ],
)
def test_empty_messages(first: dict[str, Any], row: dict[str, Any]) -> None:
    assert_error(validate(jsonl(first, row)), 2, "empty_messages")


@pytest.mark.parametrize(
    ("first", "row"),
    [
        (OPENAI_PREF, {**OPENAI_PREF, "non_preferred_output": OPENAI_PREF["preferred_output"]}),
        (TRL_STRING, {**TRL_STRING, "rejected": "Hi!"}),
        (TRL_CONVERSATION, {**TRL_CONVERSATION, "rejected": [assistant("Hi!")]}),
        (TRL_IMPLICIT, {**TRL_IMPLICIT, "rejected": TRL_IMPLICIT["chosen"]}),
    ],
)
def test_identical_pair(first: dict[str, Any], row: dict[str, Any]) -> None:
    assert_error(validate(jsonl(first, row)), 2, "identical_pair")


@pytest.mark.parametrize(
    ("first", "row", "path"),
    [
        (
            OPENAI_PREF,
            {**OPENAI_PREF, "input": {"messages": [user("Hi"), assistant("Hello")]}},
            "input.messages[1]",
        ),
        (TRL_CONVERSATION, {**TRL_CONVERSATION, "prompt": [user("Hi"), assistant("Hello")]}, "prompt[1]"),
        (
            TRL_IMPLICIT,
            {
                "chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
                "rejected": [user("a"), assistant("b"), user("e"), assistant("f")],
            },
            "chosen[1]",
        ),
    ],
)
def test_prompt_ends_with_assistant(first: dict[str, Any], row: dict[str, Any], path: str) -> None:
    error = assert_error(validate(jsonl(first, row)), 2, "prompt_ends_with_assistant")
    assert error.message.startswith(f"{path}.role:")


@pytest.mark.parametrize(
    ("first", "row"),
    [
        (SFT, {"messages": [user("Hi"), assistant("Hello"), system("bye")]}),
        (TRL_CONVERSATION, {**TRL_CONVERSATION, "chosen": [assistant("Hi"), user("more?")]}),
    ],
)
def test_wrong_last_turn(first: dict[str, Any], row: dict[str, Any]) -> None:
    assert_error(validate(jsonl(first, row)), 2, "wrong_last_turn")


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [user("Hi"), assistant("Hello", weight=2)]},
        {
            "messages": [
                user(
                    "Hi",
                ),
                assistant("Hello", weight=True),
            ]
        },
        {"messages": [{"role": "user", "content": "Hi", "weight": 1}, assistant("Hello")]},
        {"messages": [user("Hi"), assistant("Hello", weight=0)]},
    ],
)
def test_invalid_weight(row: dict[str, Any]) -> None:
    assert_error(validate(jsonl(SFT, row)), 2, "invalid_weight")


def test_unknown_format_names_keys() -> None:
    error = assert_error(validate(jsonl(SFT, {"text": "hello", "label": 1})), 2, "unknown_format")
    assert "'text'" in error.message and "'label'" in error.message


def test_mixed_kinds() -> None:
    report = validate(jsonl(OPENAI_PREF, OPENAI_PREF, SFT, PPO_PROMPT))
    error = assert_error(report, 3, "mixed_format")
    assert error.message.startswith("supervised example (messages) in a preference file")
    assert_error(report, 4, "mixed_format")
    assert (report.kind, report.n_examples, report.n_errors) == (DatasetKind.PREFERENCE, 2, 2)


def test_kind_is_set_by_first_valid_line() -> None:
    report = validate(jsonl("garbage", PPO_PROMPT, SFT))
    assert report.kind == DatasetKind.PROMPTS
    assert_error(report, 1, "invalid_json")
    error = assert_error(report, 3, "mixed_format")
    assert "supervised example" in error.message and "prompts file" in error.message


def test_mixed_variants_of_one_kind() -> None:
    report = validate(jsonl(SFT, PROMPT_COMPLETION))
    error = assert_error(report, 2, "mixed_format")
    assert "prompt_completion example in a messages supervised file" in error.message


def test_too_deep_within_limit_of_json_parser() -> None:
    nested: Any = "x"
    for _ in range(40):
        nested = {"a": nested}
    report = validate(jsonl(SFT, {**SFT, "metadata": nested}))
    assert_error(report, 2, "too_deep")
    assert validate(jsonl(SFT, {**SFT, "metadata": nested}), max_depth=64).ok


@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")])
def test_very_deep_nesting_is_reported_not_raised(opener: str, closer: str) -> None:
    deep = opener * 100_000 + "1" + closer * 100_000
    report = validate(jsonl(SFT, deep, SFT))
    error = assert_error(report, 2, "too_deep")
    assert "32" in error.message
    assert report.n_examples == 2


def test_line_too_long_is_skipped_with_bounded_memory() -> None:
    """A 10 MB line against a 1 MB limit: reported, not buffered, and the next line still checked."""
    big = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'

    def chunks() -> Iterator[bytes]:
        yield json.dumps(PPO_PROMPT).encode() + b"\n"
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]
        yield b"\n" + json.dumps(PPO_PROMPT).encode() + b"\n{bad\n"

    tracemalloc.start()
    try:
        report = validate_jsonl(chunks(), max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = assert_error(report, 2, "line_too_long")
    assert str(len(big)) in error.message
    assert peak < 3 << 20, peak
    assert_error(report, 4, "invalid_json")
    assert (report.n_lines, report.n_examples, report.n_errors) == (4, 2, 2)


def test_line_too_long_from_a_file_object_and_at_end_of_file() -> None:
    report = validate(json.dumps(SFT).encode() + b"\n" + b"y" * (10 << 20), max_line_bytes=1 << 20)
    assert_error(report, 2, "line_too_long")
    assert report.n_examples == 1


def test_line_at_the_limit_is_accepted() -> None:
    line = json.dumps({"prompt": "x" * 100}).encode()
    assert validate(line + b"\n", max_line_bytes=len(line)).ok
    assert_error(validate(line + b"\n", max_line_bytes=len(line) - 1), 1, "line_too_long")


# --- reporting ------------------------------------------------------------------------------------


def test_error_cap_keeps_total_counts() -> None:
    rows: list[dict[str, Any] | str] = [SFT]
    rows += ["{bad"] * 30 + [{"messages": [user("x"), {"role": "bot", "content": "y"}]}] * 20
    report = validate(jsonl(*rows))
    assert len(report.errors) == MAX_REPORTED_ERRORS == 20
    assert [error.line for error in report.errors] == list(range(2, 22))
    assert report.n_errors == 50
    assert report.error_counts == {"invalid_json": 30, "unknown_role": 20}
    details = report.status_details()
    assert details is not None
    assert details.startswith("50 invalid lines out of 51 (invalid_json: 30, unknown_role: 20).\nline 2: ")
    assert details.endswith("... and 30 more")
    assert details.count("\nline ") == 20
    summary = report.to_dict()
    assert summary["n_errors"] == 50 and len(summary["errors"]) == 20
    assert summary["errors"][0] == {"line": 2, "kind": "invalid_json", "message": report.errors[0].message}


def test_max_errors_parameter() -> None:
    report = validate(jsonl(*["{bad"] * 5), max_errors=2)
    assert len(report.errors) == 2 and report.n_errors == 5


def test_status_details_singular() -> None:
    details = validate(jsonl(SFT, "{bad")).status_details()
    assert details is not None and details.startswith(
        "1 invalid line out of 2 (invalid_json: 1).\nline 2: invalid JSON"
    )


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_chunked_input_gives_the_same_report(size: int) -> None:
    data = (
        jsonl(SFT, SFT_MULTI, "{bad", b'{"prompt": "caf\xc3\xa9 \xff"}', "", PROMPT_COMPLETION, SFT) + b"[1]"
    )
    whole = validate(data)
    chunks = [data[start : start + size] for start in range(0, len(data), size)]
    chunked = validate_jsonl(chunks)
    assert chunked == whole
    assert whole.error_counts == {"invalid_json": 1, "invalid_utf8": 1, "mixed_format": 1, "wrong_type": 1}
    assert (whole.n_lines, whole.n_examples) == (7, 3)


def test_text_mode_source_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="binary mode"):
        validate_jsonl(io.StringIO("{}\n"))  # type: ignore[arg-type]


# --- helpers --------------------------------------------------------------------------------------


def test_detect_kind_rejects_invalid_examples() -> None:
    assert detect_kind({"messages": [user("Hi"), assistant("")]}) is None
    assert detect_kind({"text": "x"}) is None
    assert detect_kind([1]) is None  # type: ignore[arg-type]
    assert detect_kind(SFT_MULTI) == (DatasetKind.SUPERVISED, "messages")


def test_compatible_kinds() -> None:
    assert compatible_kinds("supervised") == {DatasetKind.SUPERVISED}
    assert compatible_kinds("dpo") == {DatasetKind.PREFERENCE}
    assert compatible_kinds("reward_model") == {DatasetKind.PREFERENCE}
    assert compatible_kinds("ppo") == {DatasetKind.PROMPTS}
    assert compatible_kinds("nope") == set()
    compatible_kinds("dpo").add(DatasetKind.PROMPTS)
    assert compatible_kinds("dpo") == {DatasetKind.PREFERENCE}
