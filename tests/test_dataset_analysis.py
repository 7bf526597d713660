"""Dataset analysis (``file.analysis``): exact numbers on crafted files, the recommendation, the API."""

from __future__ import annotations

import math
from typing import Any

from service.datasets.analysis import analyze_jsonl, jaccard, same_prefix
from tests.conftest import Api, jsonl


def analyze(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return analyze_jsonl([jsonl(rows)])


def msgs(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


# 9 pairs whose chosen answer (63 chars) is longer than the rejected one (16 chars), one near-duplicate
# pair with a shared prefix whose chosen is shorter (28 vs 29 chars), one short chosen (4 vs 18 chars).
# Prompts 10 and 11 repeat prompts 1 and 2 (the second with extra whitespace): 2 duplicates.
BIASED = [{"prompt": f"Tell me about topic {i}.",
            "chosen": f"Here is a detailed answer about topic {i}, with many extra words.",
            "rejected": f"No idea about {i}."} for i in range(9)] + [
    {"prompt": "Tell me about topic 0.", "chosen": "the cat sat on the mat today",
     "rejected": "the cat sat on the mat today!"},
    {"prompt": "Tell  me about topic 1. ", "chosen": "Yes.", "rejected": "No, certainly not."},
]


def test_length_bias_and_duplicates_exact() -> None:
    a = analyze(BIASED)
    assert (a["format"], a["variant"], a["examples"]) == ("preference", "trl_preference", 11)
    assert a["duplicate_prompts"] == {"count": 2, "share": round(2 / 11, 4), "unique_prompts": 9}
    p = a["preference"]
    assert (p["chosen_longer"], p["rejected_longer"], p["chosen_longer_share"]) == (9, 2, round(9 / 11, 4))
    assert p["mean_length_ratio"] == round((9 * 63 / 16 + 28 / 29 + 4 / 18) / 11, 4) == 3.3296
    assert p["mean_chosen_chars"] == round((9 * 63 + 28 + 4) / 11, 2)
    assert p["mean_rejected_chars"] == round((9 * 16 + 29 + 18) / 11, 2)
    assert (p["identical_prefix"], p["identical_prefix_share"]) == (1, round(1 / 11, 4))
    assert (p["near_duplicate_pairs"], p["near_duplicate_share"]) == (1, round(1 / 11, 4))
    # tokens: ceil(chars / 4) per message; prompts are 22 chars (6 tokens) but the last one (24 chars, 6)
    prompt_tokens = 11 * 6
    completion_tokens = 9 * (math.ceil(63 / 4) + math.ceil(16 / 4)) + (7 + 8) + (1 + 5)
    assert a["tokens"]["prompt"] == prompt_tokens and a["tokens"]["completion"] == completion_tokens
    assert a["tokens"]["total"] == prompt_tokens + completion_tokens == 267
    assert a["tokens"]["max_per_example"] == 6 + 16 + 4
    assert a["turns"] == {"mean": 1.0, "max": 1, "multi_turn_examples": 0, "multi_turn_share": 0.0}
    rec = a["recommendation"]
    assert rec["method"] == "dpo"
    assert any(w.startswith("length bias: the chosen answer is longer in 82% of pairs")
               for w in rec["warnings"])
    assert any(w.startswith("2 of 11 examples (18%) repeat an earlier prompt") for w in rec["warnings"])


def test_shorter_chosen_bias_and_boundaries() -> None:
    # 1 of 5 chosen longer: share 0.2 is not below 0.2, so no warning; 0 of 5 is.
    rows = [{"prompt": f"q{i}", "chosen": "short" if i else "a much longer chosen answer",
             "rejected": "a longer rejected"} for i in range(5)]
    a = analyze(rows)
    assert a["preference"]["chosen_longer_share"] == 0.2
    assert not any("length bias" in w for w in a["recommendation"]["warnings"])
    rows[0]["chosen"] = "tiny"
    a = analyze(rows)
    assert a["preference"]["chosen_longer_share"] == 0.0
    assert any(w.startswith("length bias: the chosen answer is shorter in 100% of pairs")
               for w in a["recommendation"]["warnings"])


def test_similarity_helpers() -> None:
    assert jaccard("The cat sat", "the CAT sat!") == 1.0
    assert jaccard("a b c d e f g h i j", "a b c d e f g h i k") == 9 / 11
    assert same_prefix("One two three four five six", "one two three four five seven")
    assert not same_prefix("One two three four six", "one two three four five")
    assert same_prefix("Paris.", "Paris is the capital")  # the shorter answer's words
    assert not same_prefix("", "x")


def test_multi_turn_openai_pairs_recommend_final_turn_dpo() -> None:
    rows = [{"input": {"messages": msgs("hi", "hello", f"and {i}?")},
             "preferred_output": [{"role": "assistant", "content": "good answer"}],
             "non_preferred_output": [{"role": "assistant", "content": "bad answer"}]} for i in range(3)]
    rows.append({"input": {"messages": msgs("single")},
                 "preferred_output": [{"role": "assistant", "content": "good answer"}],
                 "non_preferred_output": [{"role": "assistant", "content": "bad answer"}]})
    a = analyze(rows)
    assert a["turns"] == {"mean": 1.75, "max": 2, "multi_turn_examples": 3, "multi_turn_share": 0.75}
    assert a["preference"]["chosen_longer_share"] == 1.0
    assert a["preference"]["identical_prefix"] == 0  # "good answer" vs "bad answer"
    rec = a["recommendation"]
    assert rec["method"] == "dpo" and "final-turn masking" in rec["reasons"][0] and "PPO" in rec["reasons"][1]


def test_implicit_prompt_pairs_split_on_shared_turns() -> None:
    rows = [{"chosen": msgs("Hi", "Hello there!"), "rejected": msgs("Hi", "What?")},
            {"chosen": msgs("Hi", "Hello there!"), "rejected": msgs("Hi", "Go away.")}]
    a = analyze(rows)
    assert a["duplicate_prompts"]["count"] == 1
    assert a["preference"]["chosen_longer"] == 2 and a["tokens"]["prompt"] == 2


def test_few_factual_pairs_recommend_collecting_more() -> None:
    rows = [{"prompt": f"What is the capital of country {i}?", "chosen": f"City {i}.",
             "rejected": f"Town {i + 1}."} for i in range(20)]
    a = analyze(rows)
    assert a["preference"]["factual_share"] == 1.0
    rec = a["recommendation"]
    assert rec["method"] == "collect_more" and rec["reasons"][0].startswith("only 20 pairs")
    # The same answers restated (style, not facts): DPO.
    style = [{**r, "rejected": f"Well, the answer is City {i}, I think."} for i, r in enumerate(rows)]
    assert analyze(style)["preference"]["factual_share"] == 0.0
    assert analyze(style)["recommendation"]["method"] == "dpo"


def test_supervised_scores_and_prompts() -> None:
    scored = [{"messages": msgs("q", "a"), "metadata": {"score": 0.5}},
              {"messages": msgs("q", "a", "q2", "b"), "metadata": {"reward": 1}}]
    a = analyze(scored)
    assert a["format"] == "supervised" and a["scored_examples"] == 2 and "preference" not in a
    assert a["recommendation"]["method"] == "reward_model" and "PPO" in a["recommendation"]["reasons"][0]
    plain = analyze([{"prompt": "p", "completion": "c"}, {"messages": msgs("q", "a", "q2", "b")}][:1])
    assert plain["recommendation"]["method"] == "supervised"
    prompts = analyze([{"prompt": "Write a haiku."}, {"prompt": "Write a haiku."}])
    assert prompts["format"] == "prompts" and prompts["duplicate_prompts"]["count"] == 1
    assert prompts["recommendation"]["method"] == "ppo"


def test_invalid_lines_are_skipped() -> None:
    data = jsonl(BIASED[:2]) + b"not json\n" + jsonl([{"prompt": "x", "completion": "y"}])
    a = analyze_jsonl([data])
    assert a["examples"] == 2 and a["format"] == "preference"


def test_file_object_and_endpoint(sqlite_api: Api) -> None:
    api = sqlite_api
    headers = api.key("acme")
    r = api.client.post("/v1/files", headers=headers, files={"file": ("b.jsonl", jsonl(BIASED))},
                        data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["analysis"]["preference"]["chosen_longer_share"] == round(9 / 11, 4)
    assert f["analysis"]["duplicate_prompts"]["count"] == 2
    got = api.client.get(f"/v1/files/{f['id']}/analysis", headers=headers)
    assert got.status_code == 200 and got.json()["object"] == "file.analysis"
    assert got.json()["recommendation"] == f["analysis"]["recommendation"]
    exact = api.client.get(f"/v1/files/{f['id']}/analysis?model=tiny-random-llama", headers=headers)
    assert exact.status_code == 501 and exact.json()["error"]["code"] == "tokenizer_unavailable"
    assert exact.json()["error"]["param"] == "model"
    unknown = api.client.get(f"/v1/files/{f['id']}/analysis?model=nope", headers=headers)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "model"
    other = api.key("globex")
    assert api.client.get(f"/v1/files/{f['id']}/analysis", headers=other).status_code == 404
    # A file stored before analysis existed gets it computed from its content on first request.
    from service.db.engine import session_scope
    from service.db.models import File

    with session_scope(api.state.sessions) as session:
        row = session.get(File, f["id"])
        assert row is not None and row.validation is not None
        row.validation = {k: v for k, v in row.validation.items() if k != "analysis"}
    assert api.client.get(f"/v1/files/{f['id']}", headers=headers).json()["analysis"] is None
    again = api.client.get(f"/v1/files/{f['id']}/analysis", headers=headers).json()
    assert again["preference"] == f["analysis"]["preference"]
    assert api.client.get(f"/v1/files/{f['id']}", headers=headers).json()["analysis"] is not None
    bad = api.client.post("/v1/files", headers=headers, files={"file": ("x.jsonl", b"nope\n")},
                          data={"purpose": "fine-tune"}).json()
    assert bad["status"] == "error" and bad["analysis"] is None
    assert api.client.get(f"/v1/files/{bad['id']}/analysis", headers=headers).status_code == 409
