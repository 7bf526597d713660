"""Over-optimization signals (``workers.signals``): the pure functions on hand-computed numbers, the
once-per-job warnings and their state across a checkpoint, and real DPO runs on tiny-random-llama
(one crafted to cross a threshold, one that must not)."""

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
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS
from workers.local import MemoryReporter, local_context, method_of
from workers.signals import (
    SIGNALS,
    OverOptimization,
    accuracy_gap,
    displacement_share,
    pair_signals,
    per_token_drift,
    slope,
)

# --------------------------------------------------------------------------- pure functions


def test_displacement_counts_drops_beyond_the_tolerance_only() -> None:
    policy = torch.tensor([-10.0, -10.05, -12.0, -9.0])
    ref = torch.tensor([-10.0, -10.0, -10.0, -10.0])
    counts = torch.tensor([4, 10, 4, 4])
    # pair 0: tie; pair 1: -0.05 over 10 tokens = -0.005/token, within 0.01; pair 2: -2 over 4 tokens,
    # displaced; pair 3: rose
    assert float(displacement_share(policy, ref, counts)) == pytest.approx(0.25)
    assert float(displacement_share(policy, ref, counts, tolerance=0.0)) == pytest.approx(0.5)


def test_drift_is_the_mean_per_token_change() -> None:
    policy, ref, counts = torch.tensor([-12.0, -3.0]), torch.tensor([-10.0, -4.0]), torch.tensor([4, 2])
    assert float(per_token_drift(policy, ref, counts)) == pytest.approx((-2 / 4 + 1 / 2) / 2)
    out = pair_signals(policy, policy - 6, ref, ref, counts, counts)
    assert float(out["logps/rejected_drift"]) == pytest.approx(((-8 / 4) + (-5 / 2)) / 2)
    assert float(out["signals/displacement"]) == pytest.approx(0.5)


def test_slope_and_accuracy_gap() -> None:
    assert slope([1.0, 3.0, 5.0, 7.0, 9.0]) == pytest.approx(2.0)
    # x = 0..4, y = 0,1,0,1,3: mean y 1, sum (x-2)(y-1) = 2+0+0+0+4 = 6, sum (x-2)^2 = 10
    assert slope([0.0, 1.0, 0.0, 1.0, 3.0]) == pytest.approx(0.6)
    assert math.isnan(slope([1.0]))
    assert accuracy_gap([1.0, 0.5, 0.75], 0.5) == pytest.approx(0.25)
    assert math.isnan(accuracy_gap([], 0.5))


def test_a_signal_warns_once_per_job_and_the_state_survives_a_checkpoint() -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []
    monitor = OverOptimization(lambda message, data: warnings.append((message, data)))
    step = {"signals/displacement": 0.8, "logps/chosen_drift": 0.0, "logps/rejected_drift": 0.0,
            "rewards/margins": 0.0, "rewards/accuracies": 1.0}
    for _ in range(4):  # a window of 5 is not full yet
        monitor.after_step(dict(step))
    assert warnings == []
    monitor.after_step(dict(step))
    assert [data["signal"] for _, data in warnings] == ["signals/displacement"]
    assert warnings[0][1]["step"] == 5 and "beta" in warnings[0][0] and "sft_weight" in warnings[0][0]
    monitor.after_step(dict(step))
    assert len(warnings) == 1
    # what a checkpoint stores and a resumed job loads (torch.load(weights_only=True) must accept it)
    path_state = monitor.state_dict()
    resumed = OverOptimization(lambda message, data: warnings.append((message, data)))
    resumed.load_state_dict(path_state)
    resumed.after_step(dict(step))
    assert len(warnings) == 1 and resumed.step == 7
    # margins rising 1 per step: slope 1 > 0.5 once the window is full; accuracy gap at an eval
    rising = OverOptimization(lambda message, data: warnings.append((message, data)))
    for i in range(5):
        out = rising.after_step({"rewards/margins": float(i), "rewards/accuracies": 1.0})
    assert out["signals/margin_growth"] == pytest.approx(1.0)
    assert rising.after_eval(5, 0.7) == {"signals/accuracy_gap": pytest.approx(0.3)}
    assert [data["signal"] for _, data in warnings[1:]] == ["signals/margin_growth", "signals/accuracy_gap"]
    assert set(SIGNALS) == {"signals/displacement", "logps/chosen_drift", "logps/rejected_drift",
                            "signals/margin_growth", "signals/accuracy_gap"}


# --------------------------------------------------------------------------- real DPO runs


def dpo_recipe(tmp_path: Path, reporter: MemoryReporter, **hyperparameters: Any) -> Any:
    from workers.recipes.dpo import DPORecipe

    hp = DpoHyperparameters(**{"batch_size": 4, "max_steps": 8, "n_epochs": 4, "eval_every_steps": 4,
                               **hyperparameters})
    ctx = local_context(tmp_path, model="tiny-random-llama", method=method_of("dpo", hp), job_id="ftjob-signals",
                        training_type=LoraTraining(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=3,
                        training_rows=PREFERENCE_ROWS, validation_rows=PREFERENCE_ROWS[:5], reporter=reporter,
                        settings=replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE),
                        store=LocalStore(tmp_path / "objects"))
    recipe = DPORecipe(ctx)
    recipe.setup()
    return recipe


def over_optimization(reporter: MemoryReporter) -> list[str]:
    return [m for m in reporter.messages("warn") if m.startswith("Over-optimization")]


def test_a_fast_dpo_run_warns_once_and_a_gentle_one_does_not(tmp_path: Path) -> None:
    """beta=2 with a 5e-2 learning rate: the margin jumps to ~6 in one step and keeps growing (slope
    over steps 1-5 ~1.3 > 0.5). A 1e-5 rate barely moves the policy: no signal crosses."""
    fast = MemoryReporter(stop_at={5: "pause"})
    recipe = dpo_recipe(tmp_path / "fast", fast, learning_rate=5e-2, beta=2.0)
    assert recipe.train().status == "paused"
    warned = over_optimization(fast)
    assert len(warned) == 1 and warned[0].startswith("Over-optimization: signals/margin_growth=")
    steps = dict(fast.steps)
    assert steps[1]["signals/displacement"] == 0.0 and steps[1]["logps/chosen_drift"] == 0.0  # policy == ref
    margins = [steps[s]["rewards/margins"] for s in range(1, 6)]
    assert steps[5]["signals/margin_growth"] == pytest.approx(slope(margins), rel=1e-5)

    # resumed from the pause checkpoint: the window and the warning come back with it, no second event
    step, _, key = fast.checkpoints[-1]
    resumed = MemoryReporter()
    again = dpo_recipe(tmp_path / "fast", resumed, learning_rate=5e-2, beta=2.0)
    again.ctx.resume_from = (step, key)
    assert again.train().status == "succeeded"
    assert again.signals.warned == ["signals/margin_growth"] and again.signals.step == 8
    assert over_optimization(resumed) == []
    assert "signals/accuracy_gap" in resumed.metrics[-1][1]  # the final evaluation's

    gentle = MemoryReporter()
    assert dpo_recipe(tmp_path / "gentle", gentle, learning_rate=1e-5).train().status == "succeeded"
    assert over_optimization(gentle) == []
    assert all(abs(values["logps/chosen_drift"]) < 0.01 for _, values in gentle.steps)


def test_a_reward_model_gets_margin_growth_and_the_accuracy_gap(tmp_path: Path) -> None:
    """The reward model has no reference, so no displacement or drift; its margin (score units) and
    train/eval accuracy are watched the same way (lr 5e-2: the margin runs away)."""
    from service.jobs.spec import RewardModelHyperparameters
    from workers.recipes.reward_model import RewardModelRecipe

    reporter = MemoryReporter()
    hp = RewardModelHyperparameters(batch_size=4, max_steps=6, n_epochs=6, eval_every_steps=6, learning_rate=5e-2)
    ctx = local_context(tmp_path, model="tiny-random-llama", method=method_of("reward_model", hp),
                        job_id="ftjob-rm-signals", training_type=LoraTraining(r=4, alpha=8,
                                                                             target_modules=["q_proj", "v_proj"]),
                        seed=3, training_rows=PREFERENCE_ROWS, validation_rows=PREFERENCE_ROWS[:5], reporter=reporter,
                        settings=replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE),
                        store=LocalStore(tmp_path / "objects"))
    recipe = RewardModelRecipe(ctx)
    recipe.setup()
    assert recipe.train().status == "succeeded"
    steps = dict(reporter.steps)
    margins = [steps[s]["margin"] for s in range(1, 7)]
    assert "signals/displacement" not in steps[6]
    assert steps[6]["signals/margin_growth"] == pytest.approx(slope(margins[1:]), rel=1e-5)  # the last 5
    evals = [values for _, values in reporter.metrics if "eval/accuracy" in values]
    train_mean = sum(steps[s]["accuracy"] for s in range(2, 7)) / 5
    assert evals[-1]["signals/accuracy_gap"] == pytest.approx(train_mean - evals[-1]["eval/accuracy"], abs=1e-6)
    warned = over_optimization(reporter)
    assert len(warned) == len({w.split("=")[0] for w in warned})  # once per signal
    assert (slope(margins[1:]) > 0.5) == any("margin_growth" in w for w in warned)
