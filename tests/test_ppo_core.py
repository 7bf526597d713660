"""PPO's pieces on numbers worked by hand (``workers.recipes.rl.core``)."""

from __future__ import annotations

import math

import pytest
import torch

from workers.recipes.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    NanGuard,
    apply_missing_eos_penalty,
    approx_kl,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    response_mask,
    reward_hacking,
    value_loss,
)


def close(actual: torch.Tensor, expected: list[list[float]], atol: float) -> None:
    expected_tensor = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected_tensor, atol=atol, rtol=0)


def t(*rows: list[float] | float) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_kl_estimators_k1_and_k3() -> None:
    # token 0: p = 0.5, p_ref = 0.25 -> k1 = ln 2; r = p_ref/p = 0.5 -> k3 = (0.5 - 1) - ln 0.5
    # token 1: p = 0.25, p_ref = 0.5 -> k1 = -ln 2;  r = 2            -> k3 = (2 - 1) - ln 2
    logps, ref = t(math.log(0.5), math.log(0.25)), t(math.log(0.25), math.log(0.5))
    assert kl_k1(logps, ref).tolist() == pytest.approx([math.log(2), -math.log(2)], abs=1e-12)
    assert kl_k3(logps, ref).tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)], abs=1e-12)
    assert kl_estimate(logps, ref, "k3").tolist() == kl_k3(logps, ref).tolist()
    assert float(kl_k3(t(-1.3), t(-1.3))) == 0.0  # identical policies: no divergence
    with pytest.raises(ValueError):
        kl_estimate(logps, ref, "k2")


def test_response_mask_truncates_after_the_first_eos() -> None:
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [0, 3, 2, 4]])
    mask, has_eos = response_mask(responses, eos_token_ids=[2, 0])
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # the EOS itself is kept
    assert has_eos.tolist() == [True, False, True]


def test_per_token_rewards_and_missing_eos_penalty() -> None:
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 9.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = apply_missing_eos_penalty(t(2.0, -1.0), torch.tensor([True, False]), penalty=1.0)
    assert scores.tolist() == [2.0, -2.0]
    assert apply_missing_eos_penalty(t(2.0, -1.0), torch.tensor([True, False]), None).tolist() == [2.0, -1.0]
    rewards, non_score = per_token_rewards(kl, scores, mask, kl_coef=0.5)
    # -0.5 * kl everywhere real; + score on the last real token; 0 after it
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]], 1e-12)
    close(rewards, [[-0.05, -0.1, 1.85], [-0.2, -2.25, 0.0]], 1e-12)
    with pytest.raises(ValueError):
        per_token_rewards(kl, scores, torch.tensor([[1, 1, 1], [0, 0, 0]]), kl_coef=0.5)


def test_gae_on_a_hand_worked_four_step_example() -> None:
    # gamma = 0.9, lam = 0.5 (gamma * lam = 0.45); row 0: r = (0, 0, 0, 1), V = (0.5, 0.4, 0.3, 0.2)
    # t=3: delta = 1 + 0 - 0.2 = 0.8                        A3 = 0.8
    # t=2: delta = 0 + 0.9*0.2 - 0.3 = -0.12                A2 = -0.12 + 0.45*0.8     = 0.24
    # t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13                A1 = -0.13 + 0.45*0.24    = -0.022
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14                A0 = -0.14 + 0.45*(-0.022) = -0.1499
    # returns = A + V = (0.3501, 0.378, 0.54, 1.0)
    # row 1 ends after 2 tokens (the value after its last real token is 0; junk after it is ignored):
    # t=1: delta = 2 + 0 - 0.5 = 1.5                        A1 = 1.5
    # t=0: delta = 0.5 + 0.9*0.5 - 1 = -0.05                A0 = -0.05 + 0.45*1.5 = 0.625
    rewards = t([0.0, 0.0, 0.0, 1.0], [0.5, 2.0, 9.0, 9.0])
    values = t([0.5, 0.4, 0.3, 0.2], [1.0, 0.5, 7.0, 7.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[-0.1499, -0.022, 0.24, 0.8], [0.625, 1.5, 0.0, 0.0]], 1e-12)
    close(returns, [[0.3501, 0.378, 0.54, 1.0], [1.625, 2.0, 0.0, 0.0]], 1e-12)
    # gamma = lam = 1: Monte Carlo, A_t = (sum of rewards from t) - V_t
    advantages, returns = gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.6, 0.7, 0.8]], 1e-12)
    close(returns, [[1.0, 1.0, 1.0, 1.0]], 1e-12)


def test_masked_statistics_and_whitening() -> None:
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(masked_mean(x, mask)) == 2.0
    assert float(masked_var(x, mask)) == 1.0  # unbiased: (1 + 0 + 1) / 2
    assert float(masked_var(x, mask, unbiased=False)) == pytest.approx(2 / 3, abs=1e-12)
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], 1e-7)
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], 1e-7)
    # all kept: mean 2.5, unbiased var 5/3
    whitened = masked_whiten(t([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4))
    std = math.sqrt(5 / 3)
    close(whitened, [[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std]], 1e-7)
    # NaN at a masked position does not leak
    assert float(masked_mean(t([1.0, math.nan]), torch.tensor([[1, 0]]))) == 1.0


def test_policy_loss_clips_at_both_boundaries() -> None:
    # cliprange 0.2; old log-probs 0 so ratio r = exp(logps)
    #  A=+1 r=1.5: max(-1.5, -1.2) = -1.2  clipped (upper bound)
    #  A=+1 r=0.5: max(-0.5, -0.8) = -0.5  unclipped (lower bound does not bind for A > 0)
    #  A=-1 r=0.5: max( 0.5,  0.8) =  0.8  clipped (lower bound)
    #  A=-1 r=1.5: max( 1.5,  1.2) =  1.5  unclipped
    ratios = [1.5, 0.5, 0.5, 1.5]
    logps = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    out = policy_loss(logps, torch.zeros(1, 4, dtype=torch.float64), t([1.0, 1.0, -1.0, -1.0]),
                      torch.ones(1, 4), cliprange=0.2)
    assert float(out.loss.detach()) == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, abs=1e-12)
    assert float(out.clipfrac) == 0.5
    assert float(out.ratio) == pytest.approx(1.0, abs=1e-12)
    expected_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert float(out.approxkl) == pytest.approx(expected_kl, abs=1e-12)
    out.loss.backward()
    # clipped tokens get no gradient; unclipped get d(-A r)/d log p / n = -A r / 4
    assert logps.grad is not None
    close(logps.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4]], 1e-12)
    # just inside / just outside each boundary
    near = [1.19, 1.21, 0.81, 0.79]
    out = policy_loss(torch.tensor([[math.log(r) for r in near]], dtype=torch.float64),
                      torch.zeros(1, 4, dtype=torch.float64), t([1.0, 1.0, -1.0, -1.0]), torch.ones(1, 4),
                      cliprange=0.2)
    assert float(out.loss) == pytest.approx((-1.19 - 1.2 + 0.81 + 0.8) / 4, abs=1e-12)
    assert float(out.clipfrac) == 0.5  # 1.21 and 0.79 clipped, 1.19 and 0.81 not
    # masked tokens count for nothing
    out = policy_loss(t([math.log(1.5), 5.0]), t([0.0, 0.0]), t([1.0, 100.0]), torch.tensor([[1, 0]]), 0.2)
    assert float(out.loss) == pytest.approx(-1.2, abs=1e-12) and float(out.clipfrac) == 1.0


def test_value_loss_clips_around_the_rollout_values() -> None:
    # old values 0, returns 1, cliprange_value 0.2 (predictions may move within [-0.2, 0.2]):
    #  v=0.5:  (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64   -> 0.64, clipped
    #  v=-0.1: inside the range: 1.21 both            -> 1.21, not clipped
    #  v=1.5:  (1.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64   -> 0.64, clipped
    values = torch.tensor([[0.5, -0.1, 1.5]], dtype=torch.float64, requires_grad=True)
    out = value_loss(values, torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64),
                     torch.ones(1, 3), cliprange_value=0.2)
    assert float(out.loss.detach()) == pytest.approx(0.5 * (0.64 + 1.21 + 0.64) / 3, abs=1e-12)
    assert float(out.clipfrac) == pytest.approx(2 / 3, abs=1e-12)
    out.loss.backward()
    assert values.grad is not None  # only the unclipped prediction learns: 0.5 * 2 * (-1.1) / 3
    close(values.grad, [[0.0, -1.1 / 3, 0.0]], 1e-12)


def test_approx_kl_explained_variance_and_entropy() -> None:
    assert float(approx_kl(t(0.3, -0.2), t(0.3, -0.2), torch.ones(1, 2))) == 0.0
    # ratio 2: (2 - 1) - ln 2
    assert float(approx_kl(t(math.log(2.0)), t(0.0), torch.ones(1, 1))) == pytest.approx(1 - math.log(2))
    returns, mask = t([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.zeros(1, 4, dtype=torch.float64), returns, mask) == pytest.approx(0.0)
    # residual (0, 0, 0, -1): unbiased var 0.25; var(returns) = 5/3
    assert explained_variance(t([1.0, 2.0, 3.0, 5.0]), returns, mask) == pytest.approx(0.85, abs=1e-12)
    assert math.isnan(explained_variance(returns, t([1.0, 1.0, 1.0, 1.0]), mask))
    # uniform over 4 -> ln 4; softmax (0.25, 0.75, ~0, ~0) -> -(0.25 ln 0.25 + 0.75 ln 0.75)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -1e9, -1e9]], dtype=torch.float64)
    entropy = entropy_from_logits(logits)
    assert entropy.tolist() == pytest.approx([math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))],
                                             abs=1e-9)


def test_kl_controllers() -> None:
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 16)
    assert fixed.value == 0.05
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(12.0, 100)  # error clipped to +0.2: beta *= 1 + 0.2 * 100 / 10000
    assert adaptive.value == pytest.approx(0.1 * 1.002, abs=1e-15)
    adaptive.update(6.6, 1000)  # error 0.1: beta *= 1.01
    assert adaptive.value == pytest.approx(0.1 * 1.002 * 1.01, abs=1e-15)
    adaptive.update(0.0, 1000)  # error clipped to -0.2: beta *= 0.98
    assert adaptive.value == pytest.approx(0.1 * 1.002 * 1.01 * 0.98, abs=1e-15)


def test_nan_guard_counts_and_gives_up_after_the_limit() -> None:
    guard = NanGuard(limit=3)
    assert guard.check(1.0) and not guard.check(math.nan) and not guard.check(math.inf)
    assert guard.count == 2
    with pytest.raises(FloatingPointError):
        guard.check(-math.inf)


def test_reward_hacking_alarm() -> None:
    assert reward_hacking([0.0, 1.0, 2.0, 3.0], [1.0, 5.0, 12.0, 20.0], kl_bound=10.0)
    assert not reward_hacking([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], kl_bound=10.0)  # KL in bounds
    assert not reward_hacking([3.0, 2.0, 1.0, 0.0], [1.0, 5.0, 12.0, 20.0], kl_bound=10.0)  # reward falling
    assert not reward_hacking([0.0, 3.0], [1.0, 20.0], kl_bound=10.0)  # too little history
