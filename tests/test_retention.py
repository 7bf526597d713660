"""The retention probe (``workers.retention``): the share on crafted grades, the recipe's
``eval/retention`` against answers generated independently (transformers' ``generate``), the
create-time 400s, and (slow) the DPO defaults on SmolLM2-135M-Instruct keeping the probed facts.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from service.jobs.spec import DpoHyperparameters, LoraTraining
from service.settings import Settings
from service.storage import LocalStore
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, Api, LiveService, jsonl
from workers.demo_data import RETENTION_FACTS, RETENTION_GRADER, retention_rows
from workers.local import local_context, method_of
from workers.retention import RetentionProbe, retention_share

TINY = "tiny-random-llama"
EQ_GRADER = {"type": "string_check", "name": "same", "operation": "eq", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}"}


# --------------------------------------------------------------------------- the share


def test_retention_share_counts_only_what_the_base_got_right() -> None:
    base = [True, True, False, True, False]
    assert retention_share(base, base) == 1.0  # policy == base
    # base right on 0, 1, 3; the policy keeps 0 and 3 (and gains 2, which does not count): 2 of 3
    assert retention_share(base, [True, False, True, True, False]) == pytest.approx(2 / 3)
    assert math.isnan(retention_share([False, False], [True, True]))  # nothing to retain
    with pytest.raises(ValueError):
        retention_share([True], [True, False])


def test_probe_grades_with_the_string_check_grader() -> None:
    from workers.base_models import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(TINY, replace(Settings.from_env(), model_cache_dir=MODEL_CACHE)))
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in RETENTION_FACTS[:4]]
    probe = RetentionProbe.build(rows, RETENTION_GRADER, tokenizer, 8)
    # ilike: the answer anywhere in the output, any case
    probe.record_base(["It is london.", "MOSCOW", "Shanghai", "Seoul, of course"])
    assert probe.base_right == [True, True, False, True]
    metrics = probe.metrics(["London", "St Petersburg", "Beijing", "seoul"])
    assert metrics == {"eval/retention": pytest.approx(2 / 3), "eval/retention_base_correct": 3.0,
                       "eval/retention_policy_correct": 3.0, "eval/retention_prompts": 4.0}
    assert probe.metrics(probe.base_answers)["eval/retention"] == 1.0
    probe.record_base(["no", "no", "no", "no"])  # nothing to retain: no share (a series holds numbers only)
    assert probe.metrics(["London", "Moscow", "x", "y"]) == {
        "eval/retention_base_correct": 0.0, "eval/retention_policy_correct": 2.0, "eval/retention_prompts": 4.0}


# --------------------------------------------------------------------------- in the recipe


def _hf_greedy(model: Any, tokenizer: Any, question: str, max_new_tokens: int) -> str:
    """An independent greedy answer: transformers' own ``generate``, one prompt at a time."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)).strip()


def test_recipe_reports_retention_against_independent_generations(tmp_path: Path) -> None:
    """Probe answers = the base's own greedy answers (``eq``): policy == base at step 0 gives 1.0; after
    the LoRA weights are randomised, the share is what transformers' ``generate`` says still matches."""
    from peft import PeftModel  # noqa: F401 - the recipe's model is one

    from workers.base_models import load_tokenizer, resolve_base_model
    from workers.modeling import load_causal_lm
    from workers.recipes.dpo import DPORecipe

    settings = replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE)
    path = resolve_base_model(TINY, settings)
    tokenizer, base = load_tokenizer(path), load_causal_lm(path).eval()
    questions = [q for q, _ in RETENTION_FACTS[:6]]
    tokens = 6
    expected = [_hf_greedy(base, tokenizer, q, tokens) for q in questions]
    answers = [*expected[:5], "no model writes this"]  # the base gets 5 of 6 right
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in zip(questions, answers,
                                                                                         strict=True)]
    hp = DpoHyperparameters(batch_size=4, max_steps=1, retention_file="probe", retention_grader=EQ_GRADER,
                            retention_max_new_tokens=tokens)
    ctx = local_context(tmp_path, model=TINY, method=method_of("dpo", hp), seed=3,
                        training_type=LoraTraining(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                        training_rows=PREFERENCE_ROWS, validation_rows=PREFERENCE_ROWS[:4], settings=settings,
                        store=LocalStore(tmp_path / "objects"), extra_files={"retention_file": rows})
    recipe = DPORecipe(ctx)
    recipe.setup()
    first = recipe.evaluate(0)  # LoRA B is zero: the policy is the base
    assert recipe.retention.base_answers == expected
    assert first["eval/retention"] == 1.0 and first["eval/retention_base_correct"] == 5.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in recipe.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    policy = [_hf_greedy(recipe.model, tokenizer, q, tokens) for q in questions]
    kept = sum(p == e for p, e in zip(policy[:5], expected[:5], strict=True))
    assert kept < 5, "the randomised adapter should change some answer"
    second = recipe.evaluate(1)
    assert second["eval/retention"] == pytest.approx(kept / 5)
    assert recipe.retention.base_answers == expected  # the base is graded once, at the first eval
    recipe.cleanup()


# --------------------------------------------------------------------------- create-time rules


def _upload(api: Api, headers: dict[str, str], rows: list[dict[str, Any]], name: str) -> str:
    r = api.client.post("/v1/files", headers=headers, files={"file": (name, jsonl(rows))},
                        data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_create_refuses_a_probe_the_grader_cannot_read(sqlite_api: Api) -> None:
    headers = sqlite_api.key("acme")
    train = _upload(sqlite_api, headers, PREFERENCE_ROWS, "train.jsonl")
    val = _upload(sqlite_api, headers, PREFERENCE_ROWS[:4], "val.jsonl")
    rows = retention_rows()[:3]
    rows[1] = {"messages": rows[1]["messages"], "reply": "Moscow"}  # line 2 lacks item.answer
    broken = _upload(sqlite_api, headers, rows, "probe_broken.jsonl")
    good = _upload(sqlite_api, headers, retention_rows(), "probe.jsonl")

    def create(validation: str | None, **hp: Any) -> Any:
        body = {"model": TINY, "training_file": train, "method": {"type": "dpo", "dpo": {"hyperparameters": hp}}}
        if validation:
            body["validation_file"] = validation
        return sqlite_api.client.post("/v1/fine_tuning/jobs", headers=headers, json={**body, "dry_run": True})

    r = create(val, retention_file=broken, retention_grader=RETENTION_GRADER)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "missing_item_field"
    assert error["param"] == "method.dpo.hyperparameters.retention_file"
    assert "line 2 has no item.answer" in error["message"]

    r = create(None, retention_file=good, retention_grader=RETENTION_GRADER)
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file", r.text

    r = create(val, retention_file=good)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "method.dpo.hyperparameters.retention_grader", r.text

    r = create(val, retention_file=train, retention_grader=RETENTION_GRADER)  # a preference file
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format", r.text

    r = create(val, retention_file=good, retention_grader=RETENTION_GRADER)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- the defaults (slow)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dpo_defaults_learn_the_preference_and_keep_the_facts(live: LiveService) -> None:
    """The DPO defaults (lr 5e-4, one epoch, beta 0.1, LoRA r 16 on q/k/v/o) on SmolLM2-135M-Instruct:
    held-out accuracy >= 0.9 and retention >= 0.8 on the shipped probe (20 facts the base knows).
    32 training pairs (4 steps of 8), 16 held-out pairs on other questions, max_length 128. The probe's
    answers get 16 new tokens, not 32: the base names every fact within its first 10 (measured), and
    half the probe's rows ramble on to the limit, so 32 doubled the evaluation's generation for nothing."""
    import time

    from bench.data import preference_pairs

    train = live.upload(preference_pairs(32, "train"), "concise_train.jsonl")["id"]
    val = live.upload(preference_pairs(16, "validation"), "concise_val.jsonl")["id"]
    probe = live.upload(retention_rows(), "probe.jsonl")["id"]
    began = time.monotonic()
    job = live.run({"model": "SmolLM2-135M-Instruct", "training_file": train, "validation_file": val, "seed": 0,
                    "method": {"type": "dpo", "dpo": {"hyperparameters": {
                        "max_length": 128, "retention_file": probe, "retention_grader": RETENTION_GRADER,
                        "retention_max_new_tokens": 16}}}},
                   timeout=600)
    print(f"SmolLM2 DPO with the defaults took {time.monotonic() - began:.0f}s")
    assert job["status"] == "succeeded", job["error"]
    accuracy = live.metric(job["id"], "eval/rewards/accuracies")
    retention = live.metric(job["id"], "eval/retention")
    print(f"accuracy {accuracy} retention {retention}")
    assert accuracy and accuracy[-1] >= 0.9, accuracy
    assert retention and retention[-1] >= 0.8, retention
    assert live.metric(job["id"], "loss")[0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts at the base
