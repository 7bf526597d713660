"""Preference generation (``method.type = "generate_preferences"``): RLAIF with a reward-model judge and
constitutional self-critique, on tiny-random-llama through one real worker for the module.

* a reward model trained on a few steps judges k=3 samples per prompt; the output is a processed
  preference file (one line per kept prompt, scores kept, chosen >= rejected + min_margin) listed in
  the job's ``result_files``, and a DPO job trains on it;
* constitution mode writes a valid file (the random model's text is gibberish: structure only), and
  with a judge it keeps exactly the revisions the judge (scored independently here) prefers;
* ``min_margin`` too high drops every pair: the job fails with ``no_pairs_kept`` and counts the drops;
* the 400s: neither judge nor constitution, an empty constitution, a judge that is a base model, not
  a reward model, another organization's or not finished; a preference file as input.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest

from service.datasets.validation import DatasetKind, compatible_kinds, validate_jsonl
from tests.conftest import MODEL_CACHE, Api, LiveService, jsonl
from workers.recipes.generate_preferences import best_over_worst, drop_reason, output_filename, preference_line

TINY = "tiny-random-llama"
PARAM = "method.generate_preferences.hyperparameters"
JUDGE_PARAM = f"{PARAM}.judge"


def prompts_rows(n: int) -> list[dict[str, Any]]:
    """Chat prompts (one file holds one format); the second one has a system turn."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]}
            for a in range(1, 5) for b in range(1, 5)]
    rows[1]["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    return rows[:n]


def rm_pairs(n: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
                     "rejected": f"Well, let me think step by step: {a} and then {b}, so maybe {a + b}."})
    return rows


def generation_job(training_file: str, hp: dict[str, Any], model: str = TINY,
                   **extra: Any) -> dict[str, Any]:
    method = {"type": "generate_preferences", "generate_preferences": {"hyperparameters": hp}}
    return {"model": model, "training_file": training_file, "seed": 5, "method": method, **extra}


def events(live: LiveService, job_id: str) -> list[dict[str, Any]]:
    return live.get(f"/v1/fine_tuning/jobs/{job_id}/events?order=asc&limit=200").json()["data"]  # type: ignore[no-any-return]


def content_lines(live: LiveService, file_id: str) -> list[dict[str, Any]]:
    r = live.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 200
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def last_metric(live: LiveService, job_id: str, name: str) -> float:
    values = live.metric(job_id, name)
    assert values, f"no {name} series"
    return values[-1]


# --------------------------------------------------------------------------- pure pieces


def test_output_lines_are_valid_preference_data_with_scores() -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    lines = [preference_line(prompt, "Hello!", "Well, hello there.", (1.5, -0.25)),
             preference_line(prompt, "Hey.", "Hello.", None, {"principle": "Be kind.", "critique": "ok"})]
    report = validate_jsonl([jsonl(lines)])
    assert report.ok and report.kind == DatasetKind.PREFERENCE and report.n_examples == 2, report.to_dict()
    assert lines[0]["chosen_score"] == 1.5 and "chosen_score" not in lines[1]
    bad = validate_jsonl([jsonl([{**lines[0], "chosen_score": "high"}])])
    assert not bad.ok and bad.error_counts == {"wrong_type": 1}
    assert "chosen_score" in (bad.status_details() or "")
    assert compatible_kinds("generate_preferences") == {DatasetKind.PROMPTS}
    assert output_filename("ftjob-1") == "ftjob-1-preferences.jsonl"


def test_best_over_worst_picks_two_different_responses() -> None:
    assert best_over_worst(["a", "b", "c"], [0.1, 0.9, -0.3]) == (1, 2)
    assert best_over_worst(["a", "b"], [0.5, 0.5]) == (0, 1)  # a tie still gives a pair


def test_drop_reasons() -> None:
    assert drop_reason("", "x", None, revised=False, min_margin=0) == "empty"
    assert drop_reason("same", "same", (1.0, 0.0), revised=False, min_margin=0) == "identical"
    # a revision must out-score its original; a tie is not a preference
    assert drop_reason("new", "old", (0.2, 0.3), revised=True, min_margin=0) == "judge"
    assert drop_reason("new", "old", (0.3, 0.3), revised=True, min_margin=0) == "judge"
    assert drop_reason("new", "old", (0.4, 0.3), revised=True, min_margin=0) is None
    assert drop_reason("new", "old", (0.4, 0.3), revised=True, min_margin=0.5) == "margin"
    # best over worst of k samples: a tie is kept unless a margin is asked for
    assert drop_reason("a", "b", (0.3, 0.3), revised=False, min_margin=0) is None
    assert drop_reason("a", "b", (0.3, 0.2), revised=False, min_margin=0.2) == "margin"


def test_creation_rules_without_a_judge(sqlite_api: Api) -> None:
    headers = sqlite_api.key("acme")

    def post(body: dict[str, Any]) -> Any:
        return sqlite_api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body)

    def upload(rows: list[dict[str, Any]]) -> str:
        r = sqlite_api.client.post("/v1/files", headers=headers, files={"file": ("p.jsonl", jsonl(rows))},
                                   data={"purpose": "fine-tune"})
        return r.json()["id"]  # type: ignore[no-any-return]

    prompts = upload(prompts_rows(4))

    def error(hp: dict[str, Any], **extra: Any) -> dict[str, Any]:
        r = post(generation_job(extra.pop("training_file", prompts), hp, **extra))
        assert r.status_code == 400, r.text
        return r.json()["error"]  # type: ignore[no-any-return]

    assert error({}) | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                           "param": JUDGE_PARAM, "code": "judge_or_constitution_required"}
    assert error({"constitution": []})["param"] == f"{PARAM}.constitution"
    assert error({"constitution": ["   "]})["param"] == f"{PARAM}.constitution"
    assert error({"constitution": ["Be brief."], "k": 1})["param"] == f"{PARAM}.k"
    assert error({"judge": TINY})["code"] == "reward_model_not_a_reward_model"
    assert error({"judge": "ft:tiny-random-llama:acme::ftjob-nope"}) | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": JUDGE_PARAM,
        "code": "reward_model_not_found"}
    too_long = error({"constitution": ["x"], "max_length": 32, "max_new_tokens": 32})
    assert too_long["param"] == f"{PARAM}.max_length"
    assert error({"constitution": ["x"]}, resources={"gpus": 2})["param"] == "resources.gpus"
    preference = upload(rm_pairs(4))
    assert error({"constitution": ["x"]}, training_file=preference)["code"] == "invalid_file_format"
    both = post({**generation_job(prompts, {"constitution": ["x"]}),
                 "method": {"type": "generate_preferences", "generate_preferences": {
                     "hyperparameters": {"constitution": ["x"]}}, "dpo": {}}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "method.dpo"
    ok = post(generation_job(prompts, {"constitution": ["Be brief."], "k": 2}))
    assert ok.status_code == 200, ok.text
    job = ok.json()
    assert job["result_files"] == [] and job["hyperparameters"]["constitution"] == ["Be brief."]
    assert job["hyperparameters"]["min_margin"] == 0.0 and job["hyperparameters"]["top_p"] == 1.0


# --------------------------------------------------------------------------- live jobs


@pytest.fixture(scope="module")
def judge(live: LiveService) -> str:
    """A tiny reward model (a few steps): the judge of this module's generation jobs."""
    rm = live.run({"model": TINY, "training_file": live.upload(rm_pairs(16), "rm.jsonl")["id"], "seed": 1,
                   "suffix": "judge", "method": {"type": "reward_model", "reward_model": {"hyperparameters": {
                       "batch_size": 8, "max_steps": 2, "learning_rate": 1e-3, "max_length": 64}}}})
    assert rm["status"] == "succeeded", rm["error"]
    return str(rm["fine_tuned_model"])


def test_judge_generation_writes_a_preference_file_a_dpo_job_trains_on(live: LiveService, judge: str) -> None:
    prompts = prompts_rows(8)
    hp = {"judge": judge, "k": 3, "max_new_tokens": 12, "max_length": 128, "batch_size": 4,
          "temperature": 1.0, "min_margin": 0.0}
    job = live.run(generation_job(live.upload(prompts, "prompts.jsonl")["id"], hp))
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"] is None and len(job["result_files"]) == 1
    assert job["progress"] == {"step": 2, "total_steps": 2}
    file_id = job["result_files"][0]
    f = live.get(f"/v1/files/{file_id}").json()
    assert f["status"] == "processed" and f["format"] == "preference" and f["purpose"] == "fine-tune"
    assert f["filename"] == f"{job['id']}-preferences.jsonl"

    kept = last_metric(live, job["id"], "pairs/kept")
    dropped = {r: last_metric(live, job["id"], f"pairs/dropped_{r}")
               for r in ("margin", "identical", "empty")}
    assert kept + sum(dropped.values()) == len(prompts) and dropped["margin"] == 0
    assert last_metric(live, job["id"], "pairs/generated") == 3 * len(prompts)
    lines = content_lines(live, file_id)
    assert len(lines) == f["examples"] == kept == len(prompts) - sum(dropped.values()) > 0
    asked = [p["messages"] for p in prompts]
    gaps = []
    for line in lines:
        assert set(line) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert line["prompt"] in asked
        assert [m["role"] for m in line["chosen"]] == ["assistant"] == [m["role"] for m in line["rejected"]]
        assert line["chosen"][0]["content"].strip() and line["chosen"] != line["rejected"]
        assert line["chosen_score"] >= line["rejected_score"] + hp["min_margin"]
        gaps.append(line["chosen_score"] - line["rejected_score"])
    assert last_metric(live, job["id"], "score/mean_gap") == pytest.approx(sum(gaps) / len(gaps), rel=1e-5)
    log = events(live, job["id"])
    summary = next(e for e in log if e["message"].startswith("Generated "))
    assert summary["data"]["prompts"] == len(prompts) and summary["data"]["kept"] == kept
    assert any(e["message"] == f"Result file created: {file_id}" for e in log)
    assert not any("New fine-tuned model" in e["message"] for e in log)
    models = {m["id"] for m in live.get("/v1/models").json()["data"]}
    assert not any(job["id"] in m for m in models)
    dpo = live.run({"model": TINY, "training_file": file_id, "seed": 3, "method": {"type": "dpo", "dpo": {
        "hyperparameters": {"batch_size": 4, "max_steps": 2, "max_length": 128}}}})
    assert dpo["status"] == "succeeded", dpo["error"]
    assert dpo["fine_tuned_model"] and dpo["result_files"] == []
    assert len(live.metric(dpo["id"], "loss")) == 2


def test_constitution_mode_writes_revised_over_original(live: LiveService) -> None:
    principles = ["Be concise.", "Do not speculate."]
    hp = {"constitution": principles, "max_new_tokens": 8, "max_length": 160, "batch_size": 4}
    job = live.run(generation_job(live.upload(prompts_rows(4), "cai.jsonl")["id"], hp, model=TINY))
    assert job["status"] == "succeeded", job["error"]
    f = live.get(f"/v1/files/{job['result_files'][0]}").json()
    assert f["status"] == "processed" and f["format"] == "preference"
    lines = content_lines(live, f["id"])
    kept = last_metric(live, job["id"], "pairs/kept")
    assert len(lines) == kept == 4 - sum(last_metric(live, job["id"], f"pairs/dropped_{r}")
                                         for r in ("identical", "empty"))
    for line in lines:
        assert set(line) == {"prompt", "chosen", "rejected", "metadata"}  # no judge: no scores
        assert line["metadata"]["principle"] in principles and isinstance(line["metadata"]["critique"], str)
        assert line["chosen"][0]["role"] == "assistant" and line["chosen"] != line["rejected"]
    assert last_metric(live, job["id"], "pairs/generated") == 3 * 4  # original, critique, revision


def judge_scores(live: LiveService, judge: str, tmp: Path, items: list[tuple[Any, str]]) -> list[float]:
    """The judge's scores computed here, from its downloaded archive (independently of the worker)."""
    from workers.reward_scoring import load_reward_model, score

    job_id = judge.rsplit(":", 1)[-1]
    with tarfile.open(fileobj=io.BytesIO(live.get(f"/v1/fine_tuning/jobs/{job_id}/adapter").content)) as tar:
        tar.extractall(tmp / "judge", filter="data")
    model, tokenizer = load_reward_model(MODEL_CACHE / TINY, tmp / "judge")
    return [float(v) for v in score(model, tokenizer, items).tolist()]


def test_constitution_with_a_judge_keeps_exactly_the_revisions_the_judge_prefers(
        live: LiveService, judge: str, tmp_path: Path) -> None:
    """Generation is seeded, so the same job without a judge writes the same (revision, original) pairs;
    scoring those here tells which ones the judged job must keep."""
    prompts = live.upload(prompts_rows(6), "cai-judge.jsonl")["id"]
    hp = {"constitution": ["Be concise."], "max_new_tokens": 6, "max_length": 128}
    plain = live.run(generation_job(prompts, hp))
    assert plain["status"] == "succeeded", plain["error"]
    candidates = content_lines(live, plain["result_files"][0])
    scores = judge_scores(live, judge, tmp_path, [(line["prompt"], line["chosen"][0]["content"])
                                                  for line in candidates]
                          + [(line["prompt"], line["rejected"][0]["content"]) for line in candidates])
    preferred = [line for i, line in enumerate(candidates) if scores[i] > scores[len(candidates) + i]]
    assert len(candidates) > 0

    judged = live.run(generation_job(prompts, {**hp, "judge": judge}))
    kept = last_metric(live, judged["id"], "pairs/kept")
    assert kept == len(preferred)
    assert last_metric(live, judged["id"], "pairs/dropped_judge") == len(candidates) - len(preferred)
    if preferred:
        assert judged["status"] == "succeeded", judged["error"]
        lines = content_lines(live, judged["result_files"][0])
        assert [line["chosen"] for line in lines] == [line["chosen"] for line in preferred]
        assert all(line["chosen_score"] > line["rejected_score"] for line in lines)
    else:
        assert judged["status"] == "failed" and judged["error"]["code"] == "no_pairs_kept"


def test_min_margin_dropping_everything_fails_with_no_pairs_kept(live: LiveService, judge: str) -> None:
    hp = {"judge": judge, "k": 2, "max_new_tokens": 4, "max_length": 64, "min_margin": 1e6}
    job = live.run(generation_job(live.upload(prompts_rows(4), "margin.jsonl")["id"], hp))
    assert job["status"] == "failed" and job["result_files"] == []
    assert job["error"]["code"] == "no_pairs_kept" and job["error"]["param"] == f"{PARAM}.min_margin"
    dropped = last_metric(live, job["id"], "pairs/dropped_margin")
    assert dropped > 0 and last_metric(live, job["id"], "pairs/kept") == 0
    assert f"margin {int(dropped)}" in job["error"]["message"]


def test_judge_must_be_a_succeeded_reward_model_of_this_organization(live: LiveService, judge: str) -> None:
    prompts = live.upload(prompts_rows(2), "p.jsonl")["id"]
    sft = live.run({"model": TINY, "training_file": live.upload(
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 4,
        "sft.jsonl")["id"], "suffix": "not-a-judge", "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"max_steps": 1}}}})
    assert sft["status"] == "succeeded", sft["error"]

    def refused(hp: dict[str, Any], headers: dict[str, str] | None = None,
                training_file: str = prompts) -> Any:
        r = live.api.client.post("/v1/fine_tuning/jobs", headers=headers or live.headers,
                                 json=generation_job(training_file, hp))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == JUDGE_PARAM, error
        return error

    assert refused({"judge": sft["fine_tuned_model"]})["code"] == "reward_model_not_a_reward_model"
    other = live.api.key("globex")
    theirs = live.api.client.post("/v1/files", headers=other, data={"purpose": "fine-tune"},
                                  files={"file": ("p.jsonl", jsonl(prompts_rows(2)))}).json()["id"]
    assert refused({"judge": judge}, headers=other, training_file=theirs)["code"] == "reward_model_not_found"
    pending = live.create_job({"model": TINY, "training_file": live.upload(rm_pairs(8), "late.jsonl")["id"],
                               "suffix": "late", "method": {"type": "reward_model", "reward_model": {
                                   "hyperparameters": {"max_steps": 50}}}})
    name = f"ft:{TINY}:{live.org}:late:{pending['id']}"
    assert refused({"judge": name})["code"] == "reward_model_not_ready"
    live.api.client.post(f"/v1/fine_tuning/jobs/{pending['id']}/cancel", headers=live.headers)
