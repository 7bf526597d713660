"""``/v1/fine_tuning/alpha/graders`` driven by the unmodified OpenAI SDK against a real ``alignd serve``.

The server is the embedded default (API + a real Celery worker), so model graders really run
``tiny-random-llama`` on the worker: its weights are random, so the tests assert the response shape,
token usage and the parse flag, not a score. The 503 (no worker) and the rate limit use the
in-process API without a worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.settings import Settings
from tests.conftest import Api, _api, jsonl
from tests.served import Served, embedded_server

STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}
SCORE_MODEL = {"type": "score_model", "name": "judge", "model": "tiny-random-llama", "range": [0, 10],
               "sampling_params": {"max_completions_tokens": 8},
               "input": [{"role": "system", "content": "Grade the answer against {{item.answer}}."},
                         {"role": "user", "content": "{{sample.output_text}}"}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("graders-serve")
    with embedded_server(root, extra_env={"ALIGND_GRADER_PICKUP_TIMEOUT": "60"}) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=served.key, max_retries=0, timeout=180)


# the SDK types a multi grader's "graders" as one grader, while OpenAI's API (and alignd) take a map by name;
# its lenient parsing keeps the map and pydantic warns about the mismatch when dumping it
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_validate_echoes_the_grader(client: openai.OpenAI) -> None:
    multi = {"type": "multi", "name": "combined", "calculate_output": "0.5 * exact + 0.5 * close",
             "graders": {"exact": STRING_CHECK,
                         "close": {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
                                   "reference": "{{item.answer}}", "evaluation_metric": "rouge_l"}}}
    for grader in (STRING_CHECK, multi, SCORE_MODEL):
        response = client.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
        assert response.to_dict()["grader"] == grader


@pytest.mark.parametrize(("grader", "param", "fragment"), [
    ({"type": "multi", "name": "m", "calculate_output": "x", "graders": {
        "ok": STRING_CHECK, "x": {**STRING_CHECK, "operation": "startswith"}}},
     "grader.graders.x.operation", "Invalid enum value 'startswith'"),
    ({"type": "multi", "name": "m", "calculate_output": "exact + missing", "graders": {"exact": STRING_CHECK}},
     "grader.calculate_output", "'missing' is not one of"),
    ({"type": "python", "name": "p", "source": "def score(sample, item):\n    return 1"},
     "grader.source", "grade(sample, item)"),
    ({"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "meteor"},
     "grader.evaluation_metric", "WordNet"),
    ({**SCORE_MODEL, "model": "gpt-4o-2024-08-06"}, "grader.model", "not a base model"),
    ({**STRING_CHECK, "input": "{{answer}}"}, "grader.input", "namespace 'answer'"),
])
def test_validate_names_the_fault(client: openai.OpenAI, grader: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.param == param
    assert fragment in info.value.message


def test_run_string_check_and_multi(client: openai.OpenAI) -> None:
    hit = client.fine_tuning.alpha.graders.run(grader=STRING_CHECK, model_sample="Paris",  # type: ignore[arg-type]
                                               item={"answer": "Paris"})
    assert hit.reward == 1.0
    assert hit.metadata.name == "exact" and hit.metadata.type == "string_check"
    assert hit.metadata.errors.invalid_variable_error is False
    assert hit.sub_rewards == {} and hit.api_model_grader_token_usage_per_model == {}
    missing = client.fine_tuning.alpha.graders.run(grader=STRING_CHECK, model_sample="Paris",  # type: ignore[arg-type]
                                                   item={"other": 1})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error is True
    multi = {"type": "multi", "name": "m", "calculate_output": "(name + email) / 2", "graders": {
        "name": {"type": "text_similarity", "name": "n", "input": "{{sample.output_json.name}}",
                 "reference": "{{item.name}}", "evaluation_metric": "fuzzy_match"},
        "email": {"type": "string_check", "name": "e", "input": "{{sample.output_json.email}}",
                  "reference": "{{item.email}}", "operation": "eq"}}}
    combined = client.fine_tuning.alpha.graders.run(  # type: ignore[arg-type]
        grader=multi, model_sample='{"name": "abcd", "email": "a@b.c"}', item={"name": "abce", "email": "a@b.c"})
    assert combined.reward == pytest.approx((0.75 + 1.0) / 2)  # fuzzy("abcd", "abce") = 0.75
    assert combined.sub_rewards == {"name": 0.75, "email": 1.0}


def test_run_python_grader(client: openai.OpenAI) -> None:
    grader = {"type": "python", "name": "fuzzy", "image_tag": "2025-05-08", "source": (
        "from rapidfuzz import fuzz, utils\n\n"
        "def grade(sample, item) -> float:\n"
        "    return fuzz.WRatio(sample['output_text'], item['reference_answer'],\n"
        "                       processor=utils.default_process) / 100.0\n")}
    response = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="fuzzy wuzzy was a bear",  # type: ignore[arg-type]
                                                    item={"reference_answer": "fuzzy wuzzy was a bear"})
    assert response.reward == 1.0 and response.metadata.errors.python_grader_runtime_error is False
    broken = client.fine_tuning.alpha.graders.run(  # type: ignore[arg-type]
        grader={**grader, "source": "def grade(sample, item):\n    return 1 / 0\n"}, model_sample="x")
    assert broken.reward == 0.0 and broken.metadata.errors.python_grader_runtime_error is True
    assert "ZeroDivisionError" in (broken.metadata.errors.python_grader_runtime_error_details or "")


def _run_on_worker(client: openai.OpenAI, grader: dict[str, Any], item: dict[str, Any]) -> Any:
    """The first model grader waits for the worker to boot (it answers 503 until then)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return client.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris", item=item)  # type: ignore[arg-type]
        except openai.InternalServerError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_score_model_runs_the_local_model_on_the_worker(client: openai.OpenAI) -> None:
    response = _run_on_worker(client, SCORE_MODEL, {"answer": "Paris"})
    errors = response.metadata.errors
    # a random model's greedy output holds no score: parse error, reward 0, never a 5xx
    assert response.reward == 0.0
    assert errors.api_model_grader_parse_error is True and errors.api_model_grader_server_error is False
    assert response.metadata.sampled_model_name == "tiny-random-llama"
    usage = response.metadata.token_usage
    assert isinstance(usage, dict) and usage["completion_tokens"] == 8  # max_completions_tokens, no EOS
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8 and usage["prompt_tokens"] > 10
    assert response.api_model_grader_token_usage_per_model == {"tiny-random-llama": usage}


def test_label_model_and_a_multi_holding_one_run_on_the_worker(client: openai.OpenAI) -> None:
    label = {"type": "label_model", "name": "verdict", "model": "tiny-random-llama", "labels": ["pass", "fail"],
             "passing_labels": ["pass"], "sampling_params": {"max_completions_tokens": 4},
             "input": [{"role": "user", "content": "Is {{sample.output_text}} right? pass or fail"}]}
    single = _run_on_worker(client, label, {})
    assert single.reward == 0.0 and single.metadata.errors.api_model_grader_parse_error is True
    multi = {"type": "multi", "name": "both", "calculate_output": "exact * verdict",
             "graders": {"exact": STRING_CHECK, "verdict": label}}
    combined = _run_on_worker(client, multi, {"answer": "Paris"})
    assert combined.sub_rewards == {"exact": 1.0, "verdict": 0.0}
    assert combined.metadata.errors.api_model_grader_parse_error is True and combined.reward == 0.0
    assert set(combined.api_model_grader_token_usage_per_model) == {"tiny-random-llama"}


def test_graders_need_a_key(served: Served) -> None:
    anonymous = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.fine_tuning.alpha.graders.validate(grader=STRING_CHECK)  # type: ignore[arg-type]


def test_a_python_grader_cannot_reach_the_server_or_its_data(client: openai.OpenAI, served: Served) -> None:
    port = int(served.base_url.rsplit(":", 1)[1])
    data_dir = Path(served.env["ALIGND_DATA_DIR"])
    assert (data_dir / "alignd.db").exists()
    grader = {"type": "python", "name": "escape", "source": (
        "import os, socket\n"
        "def grade(sample, item):\n"
        "    escaped = 0.0\n"
        "    for port in (item['port'], 6379):\n"
        "        try:\n"
        "            socket.create_connection(('127.0.0.1', port), timeout=1).close()\n"
        "            escaped += 1\n"
        "        except OSError:\n"
        "            pass\n"
        "    for path in (item['data'], item['data'] + '/alignd.db'):\n"
        "        try:\n"
        "            os.listdir(path) if path == item['data'] else open(path, 'rb').read()\n"
        "            escaped += 10\n"
        "        except OSError:\n"
        "            pass\n"
        "    return escaped + 100 * any('ALIGND' in key for key in os.environ)\n")}
    response = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x",  # type: ignore[arg-type]
                                                    item={"port": port, "data": str(data_dir)})
    assert response.metadata.errors.python_grader_runtime_error is False
    assert response.reward == 0.0
    # and afterwards the service is healthy and a plain grader still works
    assert httpx.get(f"{served.base_url}/healthz").json() == {"status": "ok"}
    plain = client.fine_tuning.alpha.graders.run(grader=STRING_CHECK, model_sample="a",  # type: ignore[arg-type]
                                                 item={"answer": "a"})
    assert plain.reward == 1.0


def test_reinforcement_job_end_to_end_through_the_sdk(client: openai.OpenAI, tmp_path: Path) -> None:
    """The unmodified SDK: upload RFT lines, create a reinforcement job, poll it to the end, read its
    events, metrics and checkpoints, and download a fine-tuned adapter that peft loads."""
    import io
    import tarfile

    rows = [{"messages": [{"role": "user", "content": f"What is {n} + 1?"}], "answer": str(n + 1)} for n in range(6)]
    uploaded = client.files.create(file=("rft.jsonl", jsonl(rows)), purpose="fine-tune")
    validation = client.files.create(file=("rft-val.jsonl", jsonl(rows[:2])), purpose="fine-tune")
    # a reward with a spread even for random text (the share of characters that are vowels), so groups
    # carry a signal and the adapter moves
    digits = {"type": "python", "name": "close", "source": (
        "def grade(sample, item):\n"
        "    text = sample['output_text']\n"
        "    return sum(c in 'aeiou' for c in text.lower()) / max(len(text), 1)\n")}
    job = client.fine_tuning.jobs.create(
        model="tiny-random-llama", training_file=uploaded.id, validation_file=validation.id, suffix="rft",
        method={"type": "reinforcement", "reinforcement": {"grader": digits, "hyperparameters": {  # type: ignore[typeddict-item]
            "n_epochs": "auto", "batch_size": 2, "eval_interval": 2, "eval_samples": 2,
            "group_size": 2, "max_new_tokens": 4, "learning_rate_multiplier": 2.0}}})
    assert job.status == "queued" and job.method.type == "reinforcement"
    assert job.method.reinforcement is not None and job.method.reinforcement.grader.type == "python"
    hp = job.method.reinforcement.hyperparameters
    assert hp is not None and (hp.n_epochs, hp.batch_size) == (1, 2)
    deadline = time.time() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tiny-random-llama:") \
        and job.fine_tuned_model.endswith(f":rft:{job.id}")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Fine-tuning started: reinforcement (grpo, grader close") for m in messages)
    assert any(m.startswith("Eval at step 2: reward=") for m in messages)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [3]  # 6 prompts / 2 a step
    metrics = client.get(f"/fine_tuning/jobs/{job.id}/metrics", cast_to=httpx.Response).json()["data"]
    names = {p["name"] for p in metrics}
    assert {"reward", "rewards/close/mean", "completions/clipped_ratio", "eval/reward"} <= names
    rewards = [p["value"] for p in metrics if p["name"] == "reward"]
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
    archive = client.get(f"/fine_tuning/jobs/{job.id}/adapter", cast_to=httpx.Response).content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import MODEL_CACHE

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(MODEL_CACHE / "tiny-random-llama")),
                                      str(tmp_path / "adapter"))
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    reads_missing = {**STRING_CHECK, "reference": "{{item.solution}}"}
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="tiny-random-llama", training_file=uploaded.id, method={
            "type": "reinforcement", "reinforcement": {"grader": reads_missing}})  # type: ignore[typeddict-item]
    assert info.value.param == "training_file" and "line 1 has no item.solution" in info.value.message


# --- in-process API without a worker ---------------------------------------------------------------------------


@pytest.fixture
def tight_api(sqlite_settings: Settings) -> Iterator[Api]:
    settings = replace(sqlite_settings, graders=replace(sqlite_settings.graders, pickup_timeout=1.0,
                                                        requests_per_minute=3))
    yield from _api(settings)


def test_model_grader_without_a_worker_answers_503_with_retry_after(tight_api: Api) -> None:
    headers = tight_api.key("acme")
    started = time.monotonic()
    response = tight_api.client.post("/v1/fine_tuning/alpha/graders/run", headers=headers,
                                     json={"grader": SCORE_MODEL, "model_sample": "Paris", "item": {"answer": "x"}})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "30"
    assert response.json()["error"]["code"] == "no_worker_available"
    assert time.monotonic() - started < 10


def test_grader_requests_are_rate_limited_per_organization(tight_api: Api) -> None:
    acme, other = tight_api.key("acme"), tight_api.key("globex")
    body = {"grader": STRING_CHECK}
    codes = [tight_api.client.post("/v1/fine_tuning/alpha/graders/validate", headers=acme, json=body).status_code
             for _ in range(3)]
    assert codes == [200, 200, 200]
    limited = tight_api.client.post("/v1/fine_tuning/alpha/graders/run", headers=acme,
                                    json={**body, "model_sample": "x"})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    ok = tight_api.client.post("/v1/fine_tuning/alpha/graders/validate", headers=other, json=body)
    assert ok.status_code == 200


def test_model_graders_over_redis_with_a_real_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production's broker: the grade task goes through Redis and its result comes back through Redis."""
    import os
    import secrets

    from tests.conftest import MODEL_CACHE, REDIS_URL
    from tests.processes import celery_worker

    env = {**os.environ, "ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_BROKER_URL": REDIS_URL,
           "ALIGND_QUEUE": "alignd-graders-" + secrets.token_hex(4), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
           "ALIGND_GRADER_PICKUP_TIMEOUT": "120"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    assert not settings.broker.embedded
    api_gen = _api(settings)
    api = next(api_gen)
    try:
        with celery_worker(settings, env, tmp_path / "worker.log"):
            response = api.client.post("/v1/fine_tuning/alpha/graders/run", headers=api.key("acme"), json={
                "grader": SCORE_MODEL, "model_sample": "Paris", "item": {"answer": "Paris"}}, timeout=300)
        assert response.status_code == 200, response.text + (tmp_path / "worker.log").read_text()[-3000:]
        body = response.json()
        assert body["metadata"]["errors"]["model_grader_parse_error"] is True
        assert body["metadata"]["token_usage"]["completion_tokens"] == 8
    finally:
        next(api_gen, None)
