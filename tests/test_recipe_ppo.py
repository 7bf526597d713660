"""PPO (RLHF) through one real worker: reward models and PPO jobs on tiny-random-llama.

The in-process tests of the shared base and the engine are in ``test_rl_engine.py`` and the
known-answer tests of the math in ``test_ppo_core.py``. Here, through the module's worker (``live``):
a reward model trained on "short answers preferred", a PPO job whose mean score rises, the 4xx
answers for a bad ``reward_model``, and the seed's pipeline SFT -> reward model -> PPO as chained
jobs; and (slow) SmolLM2-135M-Instruct: a reward model trained on concise-vs-verbose pairs, and PPO
raising its mean score by a clear margin while the KL stays under the alarm bound.

Why ``temperature`` 0.1 on tiny-random-llama: its output embedding is tied to the input embedding
(std 0.02) behind an RMSNorm, so every logit lies within about +-1.3 and the temperature-1
distribution is nearly uniform over 49k tokens whatever LoRA does to attention. Sampling at 0.1
gives the policy logits a range it can actually move.

The jobs other tests build on (a trained reward model, an SFT model) are module fixtures, so every
test can run alone and in any order.
"""

from __future__ import annotations

import io
import math
import random
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODEL_CACHE, LiveService

TINY = "tiny-random-llama"
REWARD_MODEL_PARAM = "method.ppo.hyperparameters.reward_model"


# --------------------------------------------------------------------------- live jobs


def arithmetic_pairs(seed: int, n: int) -> list[dict[str, Any]]:
    """Chosen: the short answer. Rejected: a long, hedging one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
                     "rejected": f"Well, let me think about this step by step. First I take {a}, then I add "
                                 f"{b} to it, and after carefully counting it all up I believe it might be "
                                 f"{a + b}."})
    return rows


def arithmetic_prompts(n: int, messages: bool = False) -> list[dict[str, Any]]:
    """``{"prompt"}`` lines, or ``{"messages"}`` ones with a system turn (one format per file)."""
    questions = [f"What is {a} plus {b}?" for a in range(1, 9) for b in range(1, 5)][:n]
    if messages:
        return [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}]}
                for q in questions]
    return [{"prompt": q} for q in questions]


def reward_model_job(model: str, training_file: str, steps: int, suffix: str = "rm") -> dict[str, Any]:
    return {"model": model, "training_file": training_file, "seed": 1, "suffix": suffix,
            "method": {"type": "reward_model", "reward_model": {"hyperparameters": {
                "batch_size": 8, "max_steps": steps, "learning_rate": 1e-3}}}}


def ppo_job(model: str, training_file: str, hp: dict[str, Any], suffix: str = "ppo",
            **extra: Any) -> dict[str, Any]:
    return {"model": model, "training_file": training_file, "seed": 2, "suffix": suffix,
            "method": {"type": "ppo", "ppo": {"hyperparameters": hp}}, **extra}


def events(live: LiveService, job_id: str) -> list[dict[str, Any]]:
    return live.get(f"/v1/fine_tuning/jobs/{job_id}/events?order=asc&limit=200").json()["data"]  # type: ignore[no-any-return]


def lora_b_max(archive: bytes, tmp: Path, base: Path) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp.iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp))
    return max(float(p.abs().max()) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.fixture(scope="module")
def reward_model(live: LiveService) -> str:
    """A reward model that prefers short answers (8 steps on 64 pairs): its fine_tuned_model."""
    rm = live.run(reward_model_job(TINY, live.upload(arithmetic_pairs(1, 64), "rm.jsonl")["id"], steps=8))
    assert rm["status"] == "succeeded", rm["error"]
    return str(rm["fine_tuned_model"])


@pytest.fixture(scope="module")
def prompts_file(live: LiveService) -> str:
    return str(live.upload(arithmetic_prompts(32), "prompts.jsonl")["id"])


@pytest.fixture(scope="module")
def sft_model(live: LiveService) -> str:
    """A short SFT job's model: a fine-tuned model that is not a reward model."""
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in arithmetic_pairs(7, 16)]
    sft = live.run({"model": TINY, "training_file": live.upload(rows, "sft.jsonl")["id"], "seed": 1,
                    "suffix": "sft", "method": {"type": "supervised", "supervised": {"hyperparameters": {
                        "batch_size": 8, "max_steps": 2, "learning_rate": 1e-3}}}})
    assert sft["status"] == "succeeded", sft["error"]
    return str(sft["fine_tuned_model"])


def tiny_parameter_bytes() -> int:
    """fp32 bytes of tiny-random-llama's weights, read from its safetensors header (tied weights once)."""
    import json
    import struct

    total = 0
    for path in (MODEL_CACHE / TINY).glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(end - begin for name, meta in header.items() if name != "__metadata__"
                     for begin, end in [meta["data_offsets"]])
    return total


def test_ppo_job_raises_the_reward_models_score(live: LiveService, tmp_path: Path, reward_model: str,
                                                prompts_file: str) -> None:
    began = time.time()
    prompts = {"id": prompts_file}
    hp = {"reward_model": reward_model, "rollout_batch_size": 16, "mini_batch_size": 8,
          "max_new_tokens": 2, "temperature": 0.1, "ppo_epochs": 4, "n_epochs": 6, "max_steps": 12,
          "learning_rate": 1e-3, "lr_scheduler": "constant", "kl_coef": 0.05, "checkpoint_every_steps": 6}
    done = live.run(ppo_job(TINY, prompts["id"], hp))
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == {"step": 12, "total_steps": 12} and done["trained_tokens"] > 0

    scores, kl = live.metric(done["id"], "objective/scores"), live.metric(done["id"], "objective/kl")
    print(f"objective/scores {scores[0]:.4f} -> {scores[-1]:.4f}: {[round(s, 4) for s in scores]}")
    print(f"objective/kl {kl[0]:.4f} -> {kl[-1]:.4f}: {[round(k, 4) for k in kl]}")
    assert len(scores) == 12 and len(kl) == 12
    assert sum(scores[-4:]) / 4 > sum(scores[:2]) / 2 + 0.03
    assert abs(kl[0]) < 1e-4  # the policy is the reference until the first update
    assert all(math.isfinite(k) for k in kl) and max(kl) < 10.0
    names = {p["name"] for p in
             live.get(f"/v1/fine_tuning/jobs/{done['id']}/metrics?step_from=2&step_to=2").json()["data"]}
    assert {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
            "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
            "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/explained_variance",
            "val/response_length_mean", "val/eos_rate", "time/generation", "time/scoring",
            "time/optimization", "timing/generation_share", "kl_coef", "learning_rate"} <= names
    shares = live.metric(done["id"], "timing/generation_share")
    assert len(shares) == 12 and all(0 < s < 1 for s in shares)
    log = events(live, done["id"])
    assert any("third LoRA adapter" in e["message"] for e in log)
    final = log[-1]
    assert final["message"] == "The job has successfully completed"
    memory = final["data"]["memory"]
    assert memory["base_copy_bytes"] > 0 and memory["peak_bytes"] > 0
    assert memory["reward_model_mode"] == "adapter"
    # one copy of the base is what its safetensors hold (fp32 on the CPU), counted independently
    # (plus the rotary frequencies, a buffer of a few hundred bytes that is not saved)
    assert 0 <= memory["base_copy_bytes"] - tiny_parameter_bytes() <= 4096
    print("memory", memory)
    ckpts = live.get(f"/v1/fine_tuning/jobs/{done['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts] == [12, 6]
    archive = live.get(f"/v1/fine_tuning/jobs/{done['id']}/adapter").content
    assert lora_b_max(archive, tmp_path / "policy", MODEL_CACHE / TINY) > 0  # the policy adapter changed
    print(f"reward model + PPO: {time.time() - began:.1f}s")


def test_reward_model_must_be_a_succeeded_reward_model_of_this_organization(
        live: LiveService, reward_model: str, prompts_file: str, sft_model: str) -> None:
    prompts, rm = prompts_file, reward_model

    def refused(hp: dict[str, Any], headers: dict[str, str] | None = None, training_file: str = prompts,
                **extra: Any) -> dict[str, Any]:
        r = live.api.client.post("/v1/fine_tuning/jobs", headers=headers or live.headers,
                                 json=ppo_job(TINY, training_file, hp, **extra))
        assert r.status_code == 400, r.text
        return r.json()["error"]  # type: ignore[no-any-return]

    def code(hp: dict[str, Any], **kwargs: Any) -> str:
        error = refused(hp, **kwargs)
        assert error["param"] == REWARD_MODEL_PARAM and error["type"] == "invalid_request_error"
        return str(error["code"])

    assert code({}) == "reward_model_required"
    assert code({"reward_model": ""}) == "reward_model_required"
    assert code({"reward_model": f"ft:{TINY}:{live.org}:rm:ftjob-doesnotexist"}) == "reward_model_not_found"
    assert code({"reward_model": "gpt-4"}) == "reward_model_not_found"
    assert code({"reward_model": TINY}) == "reward_model_not_a_reward_model"
    assert code({"reward_model": sft_model}) == "reward_model_not_a_reward_model"
    # another organization's reward model answers exactly like one that does not exist
    other = live.api.key("globex")
    theirs = live.api.client.post("/v1/files", headers=other, data={"purpose": "fine-tune"},
                                  files={"file": ("p.jsonl", b'{"prompt": "Hi"}\n')}).json()["id"]
    error = refused({"reward_model": rm}, headers=other, training_file=theirs)
    assert error["code"] == "reward_model_not_found" and error["param"] == REWARD_MODEL_PARAM
    missing = refused({"reward_model": rm.rsplit(":", 1)[0] + ":ftjob-doesnotexist"}, headers=other,
                      training_file=theirs)
    missing_name = missing["message"].split("'")[1]
    assert error["message"].replace(rm, "X") == missing["message"].replace(missing_name, "X")
    # a reward-model job that has not finished yet
    pending = live.create_job(reward_model_job(TINY, live.upload(arithmetic_pairs(5, 8), "late.jsonl")["id"],
                                               steps=50, suffix="late"))
    name = f"ft:{TINY}:{live.org}:late:{pending['id']}"
    assert code({"reward_model": name}) == "reward_model_not_ready"
    live.api.client.post(f"/v1/fine_tuning/jobs/{pending['id']}/cancel", headers=live.headers)
    # the shape of the rest of the request
    error = refused({"reward_model": rm, "rollout_batch_size": 4, "mini_batch_size": 8})
    assert error["param"] == "method.ppo.hyperparameters.mini_batch_size"
    error = refused({"reward_model": rm}, training_type={"type": "full"})
    assert error["param"] == "training_type"
    error = refused({"reward_model": rm, "max_length": 64, "max_new_tokens": 64})
    assert error["param"] == "method.ppo.hyperparameters.max_length"


def test_sft_then_reward_model_then_ppo_as_chained_jobs(live: LiveService, sft_model: str) -> None:
    """The seed's three stages as three jobs; then PPO from the base with the chained reward model,
    which has to be loaded as its own model (it was trained on a different base)."""
    began = time.time()
    preferences = live.upload(arithmetic_pairs(8, 16), "rm2.jsonl")
    rm = live.run(reward_model_job(sft_model, preferences["id"], steps=2, suffix="rm-chained"))
    assert rm["status"] == "succeeded", rm["error"]
    hp = {"reward_model": rm["fine_tuned_model"], "rollout_batch_size": 4, "mini_batch_size": 2,
          "max_new_tokens": 4, "ppo_epochs": 1, "max_steps": 2}
    prompts = live.upload(arithmetic_prompts(8, messages=True), "prompts-messages.jsonl")["id"]
    ppo = live.run(ppo_job(sft_model, prompts, {**hp, "eval_every_steps": 1}, suffix="chained",
                           validation_file=prompts))
    assert ppo["status"] == "succeeded", ppo["error"]
    evaluated = live.get(f"/v1/fine_tuning/jobs/{ppo['id']}/metrics?name=eval/objective/scores").json()["data"]
    assert [p["step"] for p in evaluated] == [1, 2]  # every step, and not twice at the end
    assert len(live.metric(ppo["id"], "eval/objective/kl")) == 2
    assert ppo["fine_tuned_model"].startswith(f"ft:{TINY}:{live.org}:chained:")
    assert any("third LoRA adapter" in e["message"] for e in events(live, ppo["id"]))
    assert len(live.metric(ppo["id"], "objective/scores")) == 2

    # k3 KL and an adaptive coefficient with a target the policy is sure to overshoot: the KL alarm fires
    alarm_hp = {**hp, "kl_estimator": "k3", "target_kl": 1e-4, "learning_rate": 1e-2, "n_epochs": 2, "max_steps": 3}
    from_base = live.run(ppo_job(TINY, prompts, alarm_hp, suffix="separate-rm"))
    assert from_base["status"] == "succeeded", from_base["error"]
    log = events(live, from_base["id"])
    assert any("loaded as its own model" in e["message"] for e in log)
    assert log[-1]["data"]["memory"]["reward_model_mode"] == "separate"
    kl = live.metric(from_base["id"], "objective/kl")
    assert kl[0] == 0.0 and all(k >= 0 and math.isfinite(k) for k in kl)  # k3 is never negative
    assert kl[-1] > 10 * 1e-4
    assert any(e["level"] == "warn" and "above 10 x target_kl" in e["message"] for e in log)
    beta = live.metric(from_base["id"], "kl_coef")
    assert beta[1] < beta[0] and beta[2] > beta[1]  # KL 0 < target at step 1 lowers beta, then above raises
    print(f"SFT -> RM -> PPO (+ PPO with a separate RM): {time.time() - began:.1f}s")


# --------------------------------------------------------------------------- a real reward (slow)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~4 minutes on an idle 2-core machine; a busy one is several times slower
def test_smollm2_ppo_raises_a_concise_answers_reward_model(live: LiveService) -> None:
    """The reward model learns concise-vs-verbose (``workers/demo_data.py``) in 3 steps; PPO from
    SmolLM2-135M-Instruct (which tends to ramble) then raises its mean score by a clear margin in
    4 rollouts of the same 16 prompts while the KL stays under the alarm bound. Per step: 24 sampled
    tokens, 2 PPO epochs of two mini-batches, lr 3e-4 (LoRA r=16 on attention). A batch's mean score
    moves by ~0.2 between two samplings of the same policy, so one rollout of 8 drawn prompts and two
    updates a step (what this test ran before) rose by 0.38 under one seed and not at all under others."""
    from workers.demo_data import FACTS, preference_rows

    smol = "SmolLM2-135M-Instruct"
    began = time.monotonic()
    rm = live.run({"model": smol, "training_file": live.upload(preference_rows(), "concise.jsonl")["id"],
                   "seed": 1, "suffix": "concise-rm",
                   "method": {"type": "reward_model", "reward_model": {"hyperparameters": {
                       "batch_size": 8, "max_steps": 3, "learning_rate": 1e-3, "max_length": 160}}}},
                  timeout=900)
    assert rm["status"] == "succeeded", rm["error"]
    # the same 16 questions every step: a batch's mean score then moves with the policy, not with
    # which questions the batch happened to draw (their scores differ by more than PPO moves them)
    prompts = live.upload([{"prompt": q} for q, _, _ in FACTS[:16]], "questions.jsonl")["id"]
    hp = {"reward_model": rm["fine_tuned_model"], "rollout_batch_size": 16, "mini_batch_size": 8, "n_epochs": 4,
          "max_new_tokens": 24, "ppo_epochs": 2, "max_steps": 4, "learning_rate": 3e-4,
          "lr_scheduler": "constant", "kl_coef": 0.05, "max_length": 256}
    done = live.run(ppo_job(smol, prompts, hp, suffix="concise"), timeout=1200)
    took = time.monotonic() - began
    assert done["status"] == "succeeded", done["error"]
    scores, kl = live.metric(done["id"], "objective/scores"), live.metric(done["id"], "objective/kl")
    length = live.metric(done["id"], "val/response_length_mean")
    print(f"SmolLM2 RM + PPO took {took:.0f}s; objective/scores {[round(s, 3) for s in scores]}; "
          f"objective/kl {[round(k, 3) for k in kl]}; response length {length}")
    assert len(scores) == 4
    assert sum(scores[-2:]) / 2 > scores[0] + 0.2, scores  # measured (seeds 2, 3): 1.04 -> 1.61, 1.25 -> 1.60
    assert all(math.isfinite(k) for k in kl) and max(kl) < 10.0, kl
    assert not any(e["level"] == "warn" and "KL" in e["message"] for e in events(live, done["id"]))
