"""Reinforcement fine-tuning with graders, in process on tiny-random-llama (``workers.recipes.rl``).

* a step's rewards are the grader's (recomputed here with rapidfuzz itself), its advantages GRPO's;
* one update raises the log-probs of completions with positive advantages and lowers the others';
* ``num_iterations`` > 1 and ``kl_coef`` > 0 compute the old and reference log-probs they need, and
  only then; RLOO and the PPO engine (the grader as its reward) train too;
* a grader that fails on some samples scores them 0, counts them and says so, and the step goes on;
* the alarms: every completion truncated, no reward signal in a whole step;
* a pause that arrives while a step samples abandons that step, and the resumed job ends with the
  adapter of an uninterrupted run (as does a pause between steps).
"""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rapidfuzz import fuzz, utils
from safetensors.torch import load

from service.graders import parse_grader
from service.jobs.spec import LoraTraining, Method, ReinforcementHyperparameters, ReinforcementMethod
from service.settings import Settings
from tests.conftest import MODEL_CACHE
from workers.archives import final_adapter_key
from workers.local import MemoryReporter, local_context

TINY = "tiny-random-llama"
FUZZY = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
ROWS = [{"messages": [{"role": "developer", "content": "Answer with a number."},
                      {"role": "user", "content": f"What is {a} plus {b}?"}], "answer": f"{a + b} apples"}
        for a in range(4) for b in range(2)]


def context(tmp: Path, grader: dict[str, Any] = FUZZY, reporter: MemoryReporter | None = None,
            rows: list[dict[str, Any]] = ROWS, **hyperparameters: Any) -> Any:
    hp = ReinforcementHyperparameters(**{"batch_size": 2, "group_size": 4, "max_new_tokens": 6, "temperature": 0.9,
                                         "learning_rate": 1e-3, "n_epochs": 2, "max_steps": 4, **hyperparameters})
    method = Method(type="reinforcement", reinforcement=ReinforcementMethod(grader=parse_grader(grader),
                                                                             hyperparameters=hp))
    return local_context(tmp, model=TINY, method=method, seed=5, training_rows=rows, reporter=reporter,
                         training_type=LoraTraining(r=4, target_modules=["q_proj", "v_proj"]),
                         settings=replace(Settings.from_env(tmp / "data"), model_cache_dir=MODEL_CACHE))


def recipe(ctx: Any) -> Any:
    from workers.recipes.rl.reinforcement import ReinforcementRecipe

    built = ReinforcementRecipe(ctx)
    built.setup()
    return built


def run(ctx: Any) -> Any:
    built = recipe(ctx)
    try:
        return built.train()
    finally:
        built.cleanup()


def adapter(ctx: Any, tmp: Path) -> dict[str, torch.Tensor]:
    path = tmp / "final.tar.gz"
    ctx.store.download_file(final_adapter_key(ctx.job_id, attempt=ctx.attempt), path)
    with tarfile.open(path, "r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return load(member.read())


# --------------------------------------------------------------------------- one step, by hand


def test_rewards_are_the_graders_and_advantages_grpos(tmp_path: Path) -> None:
    built = recipe(context(tmp_path))
    prompts = built.prompts[:2]
    r, _ = built.group.rollout(prompts)
    assert len(r) == 8 and r.prompts == prompts
    expected = [fuzz.WRatio(text, prompts[i // 4].item["answer"], processor=utils.default_process) / 100
                for i, text in enumerate(r.texts)]
    assert r.rewards.tolist() == pytest.approx(expected, abs=1e-6)
    advantages, _ = built.group.advantages(r)
    for g in range(2):
        group = torch.tensor(expected[4 * g:4 * g + 4])
        assert advantages[4 * g:4 * g + 4].tolist() == pytest.approx(
            ((group - group.mean()) / (group.std() + 1e-4)).tolist(), abs=1e-5)
    # the developer turn was read as a system turn
    assert built.tokenizer.decode(prompts[0].ids).startswith("<|im_start|>system\nAnswer with a number.")
    built.cleanup()


def test_an_update_moves_log_probs_the_way_the_advantages_point(tmp_path: Path) -> None:
    built = recipe(context(tmp_path, learning_rate=1e-4))
    engine = built.group
    r, _ = engine.rollout(built.prompts[:2])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0])

    def sequence_logps() -> torch.Tensor:
        with torch.no_grad():
            logps, _ = engine._logps(r)
        return (logps * r.mask).sum(dim=1)

    before = sequence_logps()
    metrics = engine.optimize(r, advantages)
    moved = sequence_logps() - before
    assert metrics["grad_norm"] > 0
    # the surrogate rose (Adam's step is a descent direction of the loss), and on average the
    # favoured completions gained what the others lost
    assert float((advantages * moved).sum()) > 0, moved
    assert float(moved[advantages > 0].mean()) > 0 > float(moved[advantages < 0].mean()), moved
    built.cleanup()


def test_old_and_reference_log_probs_only_when_the_loss_needs_them(tmp_path: Path) -> None:
    plain = recipe(context(tmp_path / "a"))
    r, _ = plain.group.rollout(plain.prompts[:2])
    assert r.old_logps is None and r.ref_logps is None  # num_iterations 1, no KL: nothing extra
    plain.cleanup()
    both = recipe(context(tmp_path / "b", num_iterations=2, kl_coef=0.1))
    r, _ = both.group.rollout(both.prompts[:2])
    assert r.old_logps is not None and r.ref_logps is not None
    assert r.old_logps.shape == r.responses.shape
    # the policy is the reference before any update (LoRA B = 0)
    torch.testing.assert_close(r.old_logps * r.mask, r.ref_logps * r.mask)
    metrics = both.group.optimize(r, both.group.advantages(r)[0])
    assert metrics["kl"] > 0  # the second iteration saw a policy that had moved
    both.cleanup()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "ppo"])
def test_every_algorithm_trains_on_a_grader(tmp_path: Path, algorithm: str) -> None:
    ctx = context(tmp_path, algorithm=algorithm, max_steps=2, kl_coef=0.05)
    result = run(ctx)
    assert result.status == "succeeded", ctx.reporter.messages()
    steps = ctx.reporter.steps
    assert [s for s, _ in steps] == [1, 2]
    for _, values in steps:
        assert {"reward", "reward_std", "rewards/close/mean", "completions/mean_length", "completions/clipped_ratio",
                "kl", "loss", "learning_rate"} <= set(values)
        assert 0.0 <= values["reward"] <= 1.0 and values["grader/errors"] == 0.0
    if algorithm != "ppo":
        assert {"frac_reward_zero_std", "clip_ratio/region_mean", "entropy",
                "timing/generation_share"} <= set(steps[0][1])
        assert 0 < steps[0][1]["timing/generation_share"] < 1
    assert any(float(t.abs().max()) > 0 for k, t in adapter(ctx, tmp_path).items() if "lora_B" in k)


# --------------------------------------------------------------------------- graders that fail, alarms


def test_a_failing_grader_scores_zero_and_the_step_goes_on(tmp_path: Path) -> None:
    flaky = {"type": "python", "name": "flaky", "source": (
        "def grade(sample, item):\n"
        "    if item['answer'].startswith('1'):\n"
        "        raise ValueError('no ones please')\n"
        "    return 0.5\n")}
    ctx = context(tmp_path, grader=flaky, max_steps=2, batch_size=4)
    assert run(ctx).status == "succeeded"
    failures = [values["grader/errors"] for _, values in ctx.reporter.steps]
    rewards = [values["reward"] for _, values in ctx.reporter.steps]
    # two steps of 4 prompts x 4 samples cover the 8 lines once; the two whose answer starts with "1"
    # (0+1, 1+0) fail on all 4 samples and score 0, every other sample scores 0.5
    assert sum(failures) == 2 * 4
    for failed, reward in zip(failures, rewards, strict=True):
        assert reward == pytest.approx(0.5 * (16 - failed) / 16, abs=1e-6)
    warnings = ctx.reporter.messages("warn")
    assert any("The grader failed on" in m and "python_grader_runtime_error" in m and "no ones please" in m
               for m in warnings)


def test_alarms_for_truncation_and_no_signal(tmp_path: Path) -> None:
    never = {"type": "string_check", "name": "never", "input": "{{sample.output_text}}", "reference": "zebra",
             "operation": "eq"}
    ctx = context(tmp_path, grader=never, max_new_tokens=1, max_steps=2)
    assert run(ctx).status == "succeeded"
    warnings = ctx.reporter.messages("warn")
    assert sum("was cut at max_new_tokens=1" in m for m in warnings) == 1  # raised once, not every step
    assert sum("got the same reward (0.000)" in m for m in warnings) == 1
    assert all(values["completions/clipped_ratio"] == 1.0 for _, values in ctx.reporter.steps)


# --------------------------------------------------------------------------- stop, pause, resume


class StopWhileSampling(MemoryReporter):
    """Answers "pause" the ``after``-th time the stop flag is read (the loop reads it once a step, the
    sampler once a token)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.reads = after, 0

    def stop_reason(self, *, min_interval: float = 0.5) -> str | None:
        self.reads += 1
        return "pause" if self.reads >= self.after else None


def test_a_pause_while_sampling_abandons_the_step_and_resumes_exactly(tmp_path: Path) -> None:
    straight = context(tmp_path / "straight")
    assert run(straight).status == "succeeded"
    # step 1 reads the flag once before it starts and 5 times while sampling 6 tokens; the 9th read is
    # inside step 2's sampling
    paused = context(tmp_path / "paused", reporter=StopWhileSampling(after=9))
    assert run(paused).status == "paused"
    assert [s for s, _ in paused.reporter.steps] == [1]
    (at, _, key), = paused.reporter.checkpoints
    assert at == 1
    resumed = replace(paused, resume_from=(at, key), reporter=MemoryReporter())
    assert run(resumed).status == "succeeded"
    assert [s for s, _ in resumed.reporter.steps] == [2, 3, 4]
    ours, theirs = adapter(resumed, tmp_path / "a"), adapter(straight, tmp_path / "b")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
    assert [v["reward"] for _, v in resumed.reporter.steps] == pytest.approx(
        [v["reward"] for _, v in straight.reporter.steps[1:]], abs=1e-6)


# --------------------------------------------------------------------------- a real task (slow)


def arithmetic(n: int, seed: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"messages": [{"role": "system", "content": "Answer with the number first."},
                                  {"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)})
    return rows


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 minutes on an idle 2-core machine; a busy one is several times slower
def test_smollm2_learns_to_put_the_sum_in_its_first_eight_tokens(tmp_path: Path) -> None:
    """GRPO on SmolLM2-135M-Instruct with a string_check grader (the answer must appear in the first 8
    tokens, which SmolLM2 rarely manages: it opens with "To find 3 + 4, ..."). Held-out prompts, 4
    samples each (64 completions: a standard error near 0.06), are evaluated before training and after
    10 steps. Measured under seeds 1, 2, 3: 0.14 -> 0.69, 0.11 -> 0.55, 0.12 -> 0.70; 6 steps were too
    few to be sure (seed 2 had no group with signal for three steps: 0.11 -> 0.33 at step 8)."""
    contains = {"type": "string_check", "name": "sum", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "like"}
    hp = ReinforcementHyperparameters(batch_size=4, group_size=4, max_new_tokens=8, temperature=1.0,
                                      learning_rate=3e-4, lr_scheduler="constant", max_steps=10, n_epochs=10,
                                      eval_interval=10, eval_samples=4, max_length=128)
    method = Method(type="reinforcement", reinforcement=ReinforcementMethod(grader=parse_grader(contains),
                                                                             hyperparameters=hp))
    ctx = local_context(tmp_path, model="SmolLM2-135M-Instruct", method=method, seed=1,
                        training_type=LoraTraining(r=16, alpha=32), training_rows=arithmetic(64, 1),
                        validation_rows=arithmetic(16, 2),
                        settings=replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE))
    built = recipe(ctx)
    try:
        before = built.evaluate(0)["eval/reward"]
        assert built.train().status == "succeeded"
    finally:
        built.cleanup()
    curve = [(step, values["eval/reward"]) for step, values in ctx.reporter.metrics if "eval/reward" in values]
    print(f"eval/reward by step: {curve}; train reward {[round(r, 3) for r in ctx.reporter.series('reward')]}")
    assert [step for step, _ in curve] == [0, 10]
    assert before < 0.3 and curve[-1][1] >= before + 0.3, curve
