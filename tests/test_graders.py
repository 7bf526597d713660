"""Graders without a server: OpenAI's semantics with hand-computed answers, templates, formulas, flags.

Known answers are worked out by hand in the comments (n-gram counts for BLEU/GLEU/ROUGE,
Levenshtein for fuzzy_match), never by calling the code's own formula.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest

from service.graders import (
    GraderInvalid,
    error_summary,
    grade,
    grade_batch,
    grader_texts,
    make_sample,
    parse_grader,
    validate_grader,
)
from service.graders.formula import Formula, FormulaError, FormulaRuntimeError
from service.graders.model_graders import (
    Generation,
    GenerationRequest,
    ModelGraderParseError,
    ModelGraderRefusal,
    PromptTooLong,
    parse_label,
    parse_score,
    render_messages,
)
from service.graders.templates import TemplateSyntaxError, item_paths, render, variables


def check(input_: str, reference: str, operation: str) -> float:
    grader = {"type": "string_check", "name": "s", "input": input_, "reference": reference, "operation": operation}
    return grade(grader, "unused").reward


@pytest.mark.parametrize(("input_", "reference", "operation", "expected"), [
    ("Paris", "Paris", "eq", 1.0), ("Paris", "paris", "eq", 0.0),
    ("Paris", "paris", "ne", 1.0), ("Paris", "Paris", "ne", 0.0),
    ("The capital is Paris.", "Paris", "like", 1.0), ("The capital is paris.", "Paris", "like", 0.0),
    ("THE CAPITAL IS PARIS.", "Paris", "ilike", 1.0), ("The capital is Lyon.", "Paris", "ilike", 0.0),
    # like/ilike are containment, not SQL patterns: % is a literal character
    ("100%", "%", "like", 1.0), ("abc", "a%", "like", 0.0),
])
def test_string_check_operations(input_: str, reference: str, operation: str, expected: float) -> None:
    assert check(input_, reference, operation) == expected


def similarity(metric: str, hypothesis: str, reference: str) -> float:
    grader = {"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
              "reference": "{{item.ref}}", "evaluation_metric": metric}
    result = grade(grader, hypothesis, {"ref": reference})
    assert not result.errors.any, result.errors.flags()
    return result.reward


HYP, REF = "the cat sat on the mat", "the cat sat on a mat"


def test_bleu_known_answer() -> None:
    # clipped n-gram precisions of HYP against REF: 1-grams 5/6 ("the" is clipped to 1), 2-grams 3/5,
    # 3-grams 2/4, 4-grams 1/3; equal lengths so no brevity penalty: BLEU = geometric mean
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert similarity("bleu", HYP, REF) == pytest.approx(expected, abs=1e-9)
    assert similarity("bleu", REF, REF) == pytest.approx(1.0)


def test_gleu_known_answer() -> None:
    # Google-BLEU: matched 1..4-grams 5+3+2+1 = 11 of 6+5+4+3 = 18 in both hypothesis and reference
    assert similarity("gleu", HYP, REF) == pytest.approx(11 / 18, abs=1e-9)


def test_rouge_known_answers() -> None:
    # "the cat sat" against "the cat sat on the mat": unigrams P = 3/3, R = 3/6 -> F = 2/3; bigrams
    # P = 2/2, R = 2/5 -> F = 2 * 0.4 / 1.4; LCS = 3 -> rouge_l equals rouge_1; no shared 4-gram
    short, long = "the cat sat", "the cat sat on the mat"
    assert similarity("rouge_1", short, long) == pytest.approx(2 / 3)
    assert similarity("rouge_2", short, long) == pytest.approx(0.8 / 1.4)
    assert similarity("rouge_3", short, long) == pytest.approx(2 * (1 * 0.25) / 1.25)  # P 1/1, R 1/4
    assert similarity("rouge_4", short, long) == 0.0
    assert similarity("rouge_l", short, long) == pytest.approx(2 / 3)
    # Porter stemming: "cats" and "cat" are one token
    assert similarity("rouge_1", "cats", "cat") == pytest.approx(1.0)


def test_fuzzy_match_known_answers() -> None:
    # Levenshtein-based ratio of "abcd" and "abce": 2 * 3 matching / 8 characters = 0.75
    assert similarity("fuzzy_match", "abcd", "abce") == pytest.approx(0.75)
    # default_process lower-cases and turns punctuation into spaces: "hello  world" vs "hello world"
    # differ by one space: 2 * 11 / 23
    assert similarity("fuzzy_match", "Hello, World!", "hello world") == pytest.approx(22 / 23)
    assert similarity("fuzzy_match", "Paris", "Paris") == 1.0


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_metrics_that_cannot_run_offline_are_refused_at_validation(metric: str) -> None:
    grader = parse_grader({"type": "text_similarity", "name": "t", "input": "a", "reference": "b",
                           "evaluation_metric": metric})
    with pytest.raises(GraderInvalid) as info:
        validate_grader(grader)
    assert info.value.param == "evaluation_metric"
    assert metric in info.value.message
    # and grading it anyway (unvalidated) flags instead of faking a score
    result = grade(grader, "a")
    assert result.reward == 0.0 and result.errors.other_error


# --- templates ---------------------------------------------------------------------------------------


def test_templates_resolve_nested_item_and_sample_paths() -> None:
    sample = make_sample(json.dumps({"answer": {"city": "Paris"}, "list": [3, 4]}))
    item = {"ref": {"cities": ["Lyon", "Paris"]}, "n": 1.5, "flag": True}
    text = ("{{ item.ref.cities[1] }}|{{sample.output_json.answer.city}}|{{sample.output_json.list[1]}}|"
            "{{item.n}}|{{item.flag}}|{{item.ref}}")
    assert render(text, sample, item) == 'Paris|Paris|4|1.5|true|{"cities": ["Lyon", "Paris"]}'


def test_template_syntax_faults_name_the_problem() -> None:
    with pytest.raises(TemplateSyntaxError, match="namespace 'row'"):
        variables("{{row.answer}}")
    with pytest.raises(TemplateSyntaxError, match="sample has no variable 'text'"):
        variables("{{sample.text}}")
    assert [v.text for v in variables("no templates here")] == []
    paths = item_paths(["{{item.a}} and {{ item.a }}", "{{item.b[0].c}}", "{{sample.output_text}}"])
    assert [v.path for v in paths] == [("a",), ("b", 0, "c")]


def test_missing_item_variable_flags_invalid_variable_and_scores_zero() -> None:
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "ne"}
    result = grade(grader, "anything", {"other": 1})
    assert result.reward == 0.0  # "ne" would have been 1.0
    assert result.errors.invalid_variable_error
    assert result.errors.flags() == ["invalid_variable_error"]


def test_output_json_of_a_non_json_sample_is_a_sample_parse_error() -> None:
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_json.a}}", "reference": "x",
              "operation": "ne"}
    result = grade(grader, "plain text")
    assert result.reward == 0.0 and result.errors.sample_parse_error


# --- multi and formulas ------------------------------------------------------------------------------


def multi(formula: str) -> dict[str, Any]:
    return {"type": "multi", "name": "combined", "calculate_output": formula, "graders": {
        "exact": {"type": "string_check", "name": "e", "input": "{{sample.output_json.email}}",
                  "reference": "{{item.email}}", "operation": "eq"},
        "close": {"type": "text_similarity", "name": "c", "input": "{{sample.output_json.name}}",
                  "reference": "{{item.name}}", "evaluation_metric": "fuzzy_match"},
    }}


ITEM = {"email": "jo@x.org", "name": "abcd"}
SAMPLE = json.dumps({"email": "jo@x.org", "name": "abce"})  # exact = 1, close = 0.75


@pytest.mark.parametrize(("formula", "expected"), [
    ("(exact + close) / 2", 0.875),
    ("0.5 * exact + 0.5 * close", 0.875),
    ("exact * close ^ 2", 0.5625),          # ^ is power and binds tighter than *
    ("-close ^ 2 + 1", 1 - 0.5625),         # -(close^2), as in mathematics
    ("2 ^ 3 ^ 2 / 512", 1.0),               # right-associative: 2^(3^2) = 512
    ("min(exact, close)", 0.75), ("max(exact, close, 0.9)", 1.0), ("abs(close - exact)", 0.25),
    ("floor(close * 10) / 10", 0.7), ("ceil(close)", 1.0), ("sqrt(close * 4) / 2", math.sqrt(3) / 2),
    ("log(exp(close))", 0.75), ("log(8, 2) / 3", 1.0),
    ("(close > 0.5) * exact", 1.0), ("close >= 0.8", 0.0), ("0 < close < 1", 1.0),
])
def test_multi_formulas(formula: str, expected: float) -> None:
    result = grade(multi(formula), SAMPLE, ITEM)
    assert not result.errors.any, result.errors.flags()
    assert result.reward == pytest.approx(expected)
    assert result.sub_rewards == {"exact": 1.0, "close": 0.75}
    assert result.metadata.scores == {"exact": 1.0, "close": 0.75}
    assert result.metadata.type == "multi" and result.metadata.name == "combined"


@pytest.mark.parametrize(("formula", "fragment"), [
    ("exact + unknown", "'unknown' is not one of"),
    ("__import__('os').system('id')", "not a formula function"),
    ("exact.__class__", "is not allowed"),
    ("[exact][0]", "is not allowed"),
    ("exact if close else 0", "is not allowed"),
    ("lambda: 1", "is not allowed"),
    ("max + 1", "is a function"),
    ("'a' + exact", "is not a number"),
    ("exact +", "cannot parse"),
    ("sqrt(exact, close)", "takes 1 argument"),
    ("round(exact)", "not a formula function"),
    ("", "empty"),
])
def test_formula_faults_are_400s_at_validation(formula: str, fragment: str) -> None:
    with pytest.raises(GraderInvalid) as info:
        validate_grader(parse_grader(multi(formula)))
    assert info.value.param == "calculate_output"
    assert fragment in info.value.message


def test_formula_errors_at_run_time_flag_instead_of_raising() -> None:
    parse_fault = grade(multi("exact +"), SAMPLE, ITEM)
    assert parse_fault.reward == 0.0 and parse_fault.errors.formula_parse_error
    division = grade(multi("exact / (close - 0.75)"), SAMPLE, ITEM)  # 1 / 0
    assert division.reward == 0.0 and division.errors.other_error
    assert division.sub_rewards == {"exact": 1.0, "close": 0.75}
    with pytest.raises(FormulaRuntimeError):
        Formula("9 ^ 9 ^ 9", []).evaluate({})  # floats overflow at once: no huge integer is built
    with pytest.raises(FormulaError):
        Formula("(" * 5000 + "1" + ")" * 5000, [])


def test_a_failing_sub_grader_zeroes_the_multi_and_propagates_its_flag() -> None:
    result = grade(multi("exact + close"), json.dumps({"email": "jo@x.org"}), ITEM)  # no "name" in the sample
    assert result.reward == 0.0
    assert result.errors.invalid_variable_error
    assert result.sub_rewards == {"exact": 1.0, "close": 0.0}


def test_multi_inside_multi_is_refused_by_the_schema() -> None:
    nested = multi("exact")
    nested["graders"]["inner"] = multi("exact")
    with pytest.raises(msgspec.ValidationError, match="graders"):
        parse_grader(nested)


# --- validation names the field ------------------------------------------------------------------------


@pytest.mark.parametrize(("grader", "param", "fragment"), [
    ({"type": "string_check", "name": "s", "input": "{{rows.a}}", "reference": "x", "operation": "eq"},
     "input", "namespace 'rows'"),
    (multi("exact") | {"graders": {"exact": {"type": "string_check", "name": "e", "input": "a",
                                             "reference": "{{sample.nope}}", "operation": "eq"}}},
     "graders.exact.reference", "no variable 'nope'"),
    ({"type": "python", "source": "def grade(sample):\n    return 1"}, "source", "exactly two arguments"),
    ({"type": "python", "source": "def score(s, i):\n    return 1"}, "source", "grade(sample, item)"),
    ({"type": "python", "source": "def grade(s, i)\n    return 1"}, "source", "line 1"),
    ({"type": "python", "source": "x" * (256 * 1024)}, "source", "256kB"),
    ({"type": "score_model", "name": "m", "model": "tiny-random-llama", "range": [1, 0],
      "input": [{"role": "user", "content": "x"}]}, "range", "low < high"),
    ({"type": "score_model", "name": "m", "model": "gpt-4o", "input": [{"role": "user", "content": "x"}]},
     "model", "not a base model"),
    ({"type": "score_model", "name": "m", "model": "tiny-random-llama",
      "input": [{"role": "user", "content": [{"type": "input_text", "text": "ok"},
                                             {"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[1]", "text only"),
    ({"type": "score_model", "name": "m", "model": "tiny-random-llama", "sampling_params": {"top_p": 0},
      "input": [{"role": "user", "content": "x"}]}, "sampling_params.top_p", "top_p"),
    ({"type": "label_model", "name": "l", "model": "tiny-random-llama", "labels": ["good", "bad"],
      "passing_labels": ["great"], "input": [{"role": "user", "content": "x"}]}, "passing_labels", "subset"),
])
def test_validation_names_the_field(grader: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(GraderInvalid) as info:
        validate_grader(parse_grader(grader), model_exists=lambda name: name == "tiny-random-llama")
    assert info.value.param == param
    assert fragment in info.value.message


def test_valid_graders_pass_validation_and_round_trip() -> None:
    graders: list[dict[str, Any]] = [
        multi("(exact + close) / 2"),
        {"type": "python", "name": "p", "source": "def grade(sample, item, extra=None):\n    return 1.0",
         "image_tag": "2025-05-08"},
        {"type": "score_model", "name": "m", "model": "tiny-random-llama", "range": [0, 10],
         "sampling_params": {"temperature": 0, "seed": 1, "reasoning_effort": "low"},
         "input": [{"role": "developer", "type": "message", "content": "Grade {{item.ref}}"},
                   {"role": "user", "content": [{"type": "input_text", "text": "{{sample.output_text}}"}]}]},
    ]
    for data in graders:
        grader = parse_grader(data)
        validate_grader(grader, model_exists=lambda name: True)
        assert msgspec.to_builtins(grader) == data  # omit_defaults: the echo is what was sent
    assert grader_texts(parse_grader(graders[0])) == ["{{sample.output_json.email}}", "{{item.email}}",
                                                     "{{sample.output_json.name}}", "{{item.name}}"]


# --- model graders without a model: prompts and parsing ---------------------------------------------------


SCORE = {"type": "score_model", "name": "judge", "model": "tiny-random-llama", "range": [0, 10],
         "input": [{"role": "developer", "content": "Compare with {{item.ref}}."},
                   {"role": "user", "content": [{"type": "input_text", "text": "Answer:"},
                                                {"type": "output_text", "text": "{{sample.output_text}}"}]}]}


def test_render_messages_fills_templates_and_asks_for_openais_response_format() -> None:
    grader = parse_grader(SCORE)
    assert not isinstance(grader, dict)
    messages = render_messages(grader, make_sample("42"), {"ref": "forty-two"})  # type: ignore[arg-type]
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Compare with forty-two.\n\n")
    assert '"result": <number>' in messages[0]["content"] and "from 0 to 10" in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": "Answer:\n42"}


@pytest.mark.parametrize(("text", "expected"), [
    ('{"steps": [{"description": "d", "conclusion": "c"}], "result": 7.5}', 7.5),
    ('Reasoning... {"result": "3"} final', 3.0),
    ("The score is 4 out of 10, so: 6", 6.0),   # no JSON: the last number
    ('{"result": 42}', 10.0),                   # clipped into the range
    ('{"result": -3}', 0.0),
])
def test_parse_score(text: str, expected: float) -> None:
    assert parse_score(text, 0.0, 10.0) == expected


def test_parse_failures_and_refusals() -> None:
    with pytest.raises(ModelGraderParseError):
        parse_score("no digits here at all", 0, 1)
    with pytest.raises(ModelGraderRefusal):
        parse_score("I'm sorry, but I can't help with grading that.", 0, 1)
    assert parse_label('{"result": "Correct"}', ["correct", "incorrect"]) == "correct"
    assert parse_label("incorrect.", ["correct", "incorrect"]) == "incorrect"
    assert parse_label("It is not correct; it is incorrect", ["correct", "incorrect"]) == "incorrect"
    with pytest.raises(ModelGraderParseError):
        parse_label("maybe", ["correct", "incorrect"])


class ScriptedRunner:
    """A stand-in for the worker's model: returns fixed text (the real model is tested in test_graders_api)."""

    def __init__(self, text: str, fail: Exception | None = None) -> None:
        self.text, self.fail, self.requests = text, fail, list[GenerationRequest]()

    def __call__(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return Generation(self.text, prompt_tokens=11, completion_tokens=3, model=request.model)


def test_model_grader_results_and_flags_with_a_runner() -> None:
    runner = ScriptedRunner('{"result": 8}')
    result = grade(SCORE, "42", {"ref": "42"}, model_runner=runner)
    assert result.reward == 8.0 and not result.errors.any
    assert result.metadata.token_usage == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                                           "cached_tokens": 0}
    assert result.model_grader_token_usage_per_model == {"tiny-random-llama": result.metadata.token_usage}
    assert result.metadata.sampled_model_name == "tiny-random-llama"
    assert runner.requests[0].temperature is None  # greedy unless sampling_params say otherwise

    unparsable = grade(SCORE, "42", {"ref": "42"}, model_runner=ScriptedRunner("hmm"))
    assert unparsable.reward == 0.0 and unparsable.errors.flags() == ["model_grader_parse_error"]
    refused = grade(SCORE, "42", {"ref": "42"}, model_runner=ScriptedRunner("I cannot grade this."))
    assert refused.errors.flags() == ["model_grader_refusal_error"]
    too_long = grade(SCORE, "42", {"ref": "42"}, model_runner=ScriptedRunner("", PromptTooLong("4096 tokens")))
    assert too_long.errors.truncated_observation_error and too_long.reward == 0.0
    no_runner = grade(SCORE, "42", {"ref": "42"})
    assert no_runner.errors.model_grader_server_error
    assert "worker" in (no_runner.errors.model_grader_server_error_details or "")

    label = {"type": "label_model", "name": "l", "model": "tiny-random-llama", "labels": ["yes", "no"],
             "passing_labels": ["yes"], "input": [{"role": "user", "content": "{{sample.output_text}}?"}]}
    assert grade(label, "x", model_runner=ScriptedRunner('{"result": "yes"}')).reward == 1.0
    failing = grade(label, "x", model_runner=ScriptedRunner('{"result": "no"}'))
    assert failing.reward == 0.0 and not failing.errors.any and failing.metadata.scores == {"label": "no"}


def test_invalid_grader_objects_never_raise_out_of_grade() -> None:
    result = grade({"type": "string_check", "name": "s"}, "x")
    assert result.reward == 0.0 and result.errors.other_error
    assert grade({"type": "string_check", "name": "s", "input": "a", "reference": "a", "operation": "eq"},
                 {"no": "output_text"}).errors.sample_parse_error  # type: ignore[arg-type]


def test_grade_batch_keeps_order_and_honours_the_batch_deadline() -> None:
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "{{item.a}}",
              "operation": "eq"}
    samples = ["x", "y", "x"]
    results = grade_batch(grader, samples, [{"a": "x"}] * 3, per_sample_timeout=5)
    assert [r.reward for r in results] == [1.0, 0.0, 1.0]
    late = grade_batch(grader, samples, [{"a": "x"}] * 3, per_sample_timeout=5, batch_timeout=0)
    assert all(r.reward == 0.0 and r.errors.unresponsive_reward_error for r in late)
    with pytest.raises(ValueError, match="3 samples but 2 items"):
        grade_batch(grader, samples, [{}, {}])
    assert error_summary(results) is None
    mixed = grade_batch(grader, samples, [{"a": "x"}, {}, {}], per_sample_timeout=5)
    assert error_summary(mixed) == {"samples": 3, "failed": 2, "flags": {"invalid_variable_error": 2},
                                    "details": None}


def test_response_shape_matches_openais_run_response() -> None:
    body = grade({"type": "string_check", "name": "s", "input": "a", "reference": "a", "operation": "eq"},
                 "a").to_dict()
    assert set(body) == {"reward", "metadata", "sub_rewards", "model_grader_token_usage_per_model"}
    assert set(body["metadata"]) == {"name", "type", "errors", "execution_time", "scores", "token_usage",
                                     "sampled_model_name"}
    assert set(body["metadata"]["errors"]) == {
        "formula_parse_error", "invalid_variable_error", "model_grader_parse_error", "model_grader_refusal_error",
        "model_grader_server_error", "model_grader_server_error_details", "other_error",
        "python_grader_runtime_error", "python_grader_runtime_error_details", "python_grader_server_error",
        "python_grader_server_error_type", "sample_parse_error", "truncated_observation_error",
        "unresponsive_reward_error"}
