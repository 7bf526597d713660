"""Reinforcement fine-tuning data and jobs: RFT lines at upload, grader and item-field checks at job creation."""

from __future__ import annotations

import io
from typing import Any

import pytest

from service.datasets.analysis import analyze_jsonl
from service.datasets.validation import DatasetKind, validate_jsonl
from tests.conftest import Api, jsonl


def rft(question: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "developer", "content": "Answer briefly."},
                         {"role": "user", "content": question}], **fields}


RFT_ROWS = [rft(f"What is {a} + {b}?", reference_answer=str(a + b), meta={"level": a}) for a in range(4)
            for b in range(3)]
GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
          "reference": "{{item.reference_answer}}", "operation": "eq"}


def validate(rows: list[dict[str, Any]] | bytes) -> Any:
    return validate_jsonl(io.BytesIO(rows if isinstance(rows, bytes) else jsonl(rows)))


def test_rft_lines_are_a_reinforcement_file() -> None:
    report = validate(RFT_ROWS)
    assert report.ok, report.status_details()
    assert report.kind == DatasetKind.REINFORCEMENT and report.variant == "messages"
    analysis = analyze_jsonl(io.BytesIO(jsonl(RFT_ROWS)), kind="reinforcement", variant="messages")
    assert analysis["reinforcement"] == {"fields": {"meta": 12, "reference_answer": 12}}
    assert analysis["recommendation"]["method"] == "reinforcement"


def test_plain_prompts_and_rft_lines_mix_into_a_reinforcement_file() -> None:
    rows = [{"messages": [{"role": "user", "content": "Say hi"}]}, *RFT_ROWS[:3]]
    report = validate(rows)
    assert report.ok and report.kind == DatasetKind.REINFORCEMENT and report.n_examples == 4
    analysis = analyze_jsonl(io.BytesIO(jsonl(rows)), kind="reinforcement", variant="messages")
    assert analysis["reinforcement"]["fields"]["reference_answer"] == 3
    assert any("reference_answer (3 of 4)" in w for w in analysis["recommendation"]["warnings"])
    # without extra fields or a developer turn it stays a PPO prompts file
    assert validate([{"messages": [{"role": "user", "content": "Say hi"}]}]).kind == DatasetKind.PROMPTS


@pytest.mark.parametrize(("row", "fragment"), [
    # extra fields are for prompts: a supervised conversation still refuses unknown keys
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "a"},
     "unknown field 'answer'"),
    ({"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "unknown role 'developer'"),
    ({"messages": [{"role": "judge", "content": "q"}], "answer": "a"}, "unknown role 'judge'"),
    ({"messages": "What is 2 + 2?", "answer": "4"}, "expected an array of messages"),
    ({"messages": [{"role": "user", "content": "q", "weight": 1}], "answer": "4"}, "only assistant turns"),
])
def test_bad_rft_lines_are_named_with_their_line_number(row: dict[str, Any], fragment: str) -> None:
    report = validate([*RFT_ROWS[:2], row])
    assert not report.ok
    assert report.errors[0].line == 3
    assert fragment in report.errors[0].message, report.errors[0].message


def test_prompt_style_lines_do_not_mix_with_rft_lines() -> None:
    report = validate([*RFT_ROWS[:2], {"prompt": "What is 1 + 1?"}])
    assert not report.ok and report.errors[0].kind == "mixed_format" and report.errors[0].line == 3


# --- job creation -------------------------------------------------------------------------------------


def upload(api: Api, headers: dict[str, str], rows: list[dict[str, Any]]) -> str:
    r = api.client.post("/v1/files", headers=headers, files={"file": ("rft.jsonl", jsonl(rows))},
                        data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "processed", body
    return str(body["id"])


def rft_job(file_id: str, grader: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    hyper = extra.pop("hyperparameters", {})
    return {"model": "tiny-random-llama", "training_file": file_id, **extra,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader or GRADER,
                                                                  "hyperparameters": hyper}}}


def test_reinforcement_job_is_created_with_resolved_hyperparameters(api: Api) -> None:
    headers = api.key("acme")
    file_id = upload(api, headers, RFT_ROWS)
    body = rft_job(file_id, hyperparameters={"n_epochs": "auto", "batch_size": "auto", "eval_interval": "auto",
                                             "learning_rate_multiplier": 0.5, "reasoning_effort": "high",
                                             "compute_multiplier": "auto"})
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and job["method"]["type"] == "reinforcement"
    assert job["method"]["reinforcement"]["grader"] == GRADER
    hp = job["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["eval_interval"], hp["compute_multiplier"]) == (1, 8, None, 1.0)
    # TRL 1.16 GRPOConfig's defaults where TRL has the knob
    assert (hp["group_size"], hp["max_new_tokens"], hp["temperature"], hp["top_p"], hp["kl_coef"]) == (
        8, 512, 1.0, 1.0, 0.0)
    assert (hp["loss_type"], hp["epsilon"], hp["epsilon_high"], hp["scale_rewards"]) == ("dapo", 0.2, None, "group")
    assert (hp["mask_truncated_completions"], hp["num_iterations"], hp["algorithm"]) == (False, 1, "grpo")
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?order=asc", headers=headers).json()["data"]
    assert any("reasoning_effort 'high' has no effect" in e["message"] for e in events)


def test_a_line_without_the_graders_field_is_a_400_naming_line_and_field(sqlite_api: Api) -> None:
    api = sqlite_api
    headers = api.key("acme")
    rows = [*RFT_ROWS[:2], rft("What is 9 + 9?", answer="18"), *RFT_ROWS[2:4]]
    file_id = upload(api, headers, rows)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=rft_job(file_id))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "training_file" and error["code"] == "missing_item_field"
    assert "line 3" in error["message"] and "item.reference_answer" in error["message"]
    # nested paths, inside a multi grader, and the validation file too
    nested = {"type": "multi", "name": "m", "calculate_output": "level", "graders": {
        "level": {"type": "string_check", "name": "l", "input": "{{item.meta.level}}", "reference": "0",
                  "operation": "eq"}}}
    good = upload(api, headers, RFT_ROWS)
    assert api.client.post("/v1/fine_tuning/jobs", headers=headers, json=rft_job(good, nested)).status_code == 200
    no_meta = upload(api, headers, [rft("q", reference_answer="1")])
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers,
                        json=rft_job(good, nested, validation_file=no_meta))
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    assert "line 1 has no item.meta.level" in r.json()["error"]["message"]


@pytest.mark.parametrize(("patch", "param"), [
    ({"grader": {"type": "multi", "name": "m", "calculate_output": "a", "graders": {
        "a": {**GRADER, "operation": "contains"}}}}, "method.reinforcement.grader.graders.a.operation"),
    ({"grader": {"type": "multi", "name": "m", "calculate_output": "a + b", "graders": {"a": GRADER}}},
     "method.reinforcement.grader.calculate_output"),
    ({"grader": {"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}", "reference": "x",
                 "evaluation_metric": "cosine"}}, "method.reinforcement.grader.evaluation_metric"),
    ({"hyperparameters": {"loss_type": "ppo"}}, "method.reinforcement.hyperparameters.loss_type"),
    ({"hyperparameters": {"group_size": 1}}, "method.reinforcement.hyperparameters.group_size"),
    ({"hyperparameters": {"epsilon": 0.2, "epsilon_high": 0.1}}, "method.reinforcement.hyperparameters.epsilon_high"),
    ({"hyperparameters": {"max_length": 256, "max_new_tokens": 256}},
     "method.reinforcement.hyperparameters.max_length"),
    ({"hyperparameters": {"batch_size": "many"}}, "method.reinforcement.hyperparameters.batch_size"),
])
def test_bad_reinforcement_specs_are_400s_naming_the_field(sqlite_api: Api, patch: dict[str, Any],
                                                           param: str) -> None:
    api = sqlite_api
    headers = api.key("acme")
    body = rft_job(upload(api, headers, RFT_ROWS))
    body["method"]["reinforcement"].update(patch)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_reinforcement_needs_a_grader_and_matching_data(sqlite_api: Api) -> None:
    api = sqlite_api
    headers = api.key("acme")
    file_id = upload(api, headers, RFT_ROWS)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={
        "model": "tiny-random-llama", "training_file": file_id, "method": {"type": "reinforcement"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.reinforcement.grader"
    # other methods cannot train on reinforcement data
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={
        "model": "tiny-random-llama", "training_file": file_id, "method": {"type": "supervised"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format"
    assert "holds reinforcement data" in r.json()["error"]["message"]
    # supervised data cannot feed a reinforcement job
    sft = upload(api, headers, [{"messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a"}]}])
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=rft_job(sft))
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    # plain prompts are fine for a grader that reads no item field
    prompts = upload(api, headers, [{"messages": [{"role": "user", "content": "Say hi"}]}])
    python = {"type": "python", "name": "len", "source": "def grade(sample, item):\n    return 1.0"}
    assert api.client.post("/v1/fine_tuning/jobs", headers=headers, json=rft_job(prompts, python)).status_code == 200
    estimate = api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**rft_job(file_id), "dry_run": True})
    assert estimate.status_code == 200 and estimate.json()["method"] == "reinforcement", estimate.text


def test_cli_builds_a_reinforcement_job_from_a_grader_file(tmp_path: Any) -> None:
    import json

    from service.cli import build_parser
    from service.cli_client import job_body

    grader_file = tmp_path / "grader.json"
    grader_file.write_text(json.dumps(GRADER))
    args = build_parser().parse_args(["jobs", "create", "--model", "tiny-random-llama", "--training-file",
                                      "file-abc", "--method", "reinforcement", "--grader", str(grader_file),
                                      "-H", "group_size=4"])
    body = job_body(args)
    assert body["method"] == {"type": "reinforcement",
                              "reinforcement": {"grader": GRADER, "hyperparameters": {"group_size": 4}}}
    inline = build_parser().parse_args(["jobs", "create", "--model", "m", "--training-file", "file-abc",
                                        "--method", "reinforcement", "--grader", json.dumps(GRADER)])
    assert job_body(inline)["method"]["reinforcement"]["grader"] == GRADER
