"""GRPO's and RLOO's pieces (``workers.recipes.rl.core``) on numbers worked by hand, and against TRL 1.16's
own ``GRPOTrainer._compute_loss`` and RLOO advantage code on the same tensors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from workers.recipes.rl.core import group_advantages, group_loss, nanstd, rloo_advantages, rloo_loss


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages, std = group_advantages(rewards, group_size=4)
    # group 1: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.57735; group 2: all equal, no signal
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert advantages.tolist() == pytest.approx([expected, -expected, -expected, expected, 0, 0, 0, 0], abs=1e-6)
    assert std.tolist() == pytest.approx([math.sqrt(1 / 3)] * 4 + [0.0] * 4, abs=1e-6)
    unscaled, _ = group_advantages(rewards, group_size=4, scale="none")
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    batch, _ = group_advantages(rewards, group_size=4, scale="batch")
    # batch std of six 1s and two 0s: mean .75, sqrt((6 * .0625 + 2 * .5625) / 7) = 0.46291
    assert batch[0] == pytest.approx(0.5 / (0.46291005 + 1e-4), abs=1e-5)
    # an unscorable (NaN) sample: left out of its group's mean, advantage 0
    with_nan, _ = group_advantages(torch.tensor([1.0, math.nan, 0.0]), group_size=3, scale="none")
    assert with_nan.tolist() == pytest.approx([0.5, 0.0, -0.5])
    assert math.isnan(float(nanstd(torch.tensor([1.0]))))


def test_rloo_advantages_by_hand() -> None:
    # baselines: (2 + 3) / 2, (1 + 3) / 2, (1 + 2) / 2
    assert rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3).tolist() == pytest.approx([-1.5, 0.0, 1.5])
    normalized = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, normalize=True)
    raw = torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    assert normalized.tolist() == pytest.approx(((raw - raw.mean()) / (raw.std() + 1e-4)).tolist(), abs=1e-6)


def test_group_loss_by_hand() -> None:
    """Two sequences (3 and 1 tokens); the update's own log-probs as old ones: ratio 1, loss = -A per token."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0])
    kwargs: dict[str, Any] = {"epsilon": 0.2, "epsilon_high": 0.2, "total_sequences": 2, "total_tokens": 4,
                              "max_completion_length": 5}
    grpo = group_loss(logps, logps.detach(), adv, mask, loss_type="grpo", **kwargs)
    assert float(grpo.loss.detach()) == pytest.approx(((-2.0) + 1.0) / 2)  # mean of per-sequence token means
    dapo = group_loss(logps, logps.detach(), adv, mask, loss_type="dapo", **kwargs)
    assert float(dapo.loss.detach()) == pytest.approx((3 * -2.0 + 1.0) / 4)  # every token weighs the same
    dr = group_loss(logps, logps.detach(), adv, mask, loss_type="dr_grpo", **kwargs)
    assert float(dr.loss.detach()) == pytest.approx((3 * -2.0 + 1.0) / (2 * 5))
    dapo.loss.backward()
    # d loss / d logp = -A / tokens on real tokens (ratio 1), zero on padding
    assert logps.grad is not None
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5, -0.5], [0.25, 0.0, 0.0]]))
    # clipping: ratio e^0.5 with a positive advantage is held at 1.2 (no gradient), counted as clipped high
    moved = torch.tensor([[0.5]], requires_grad=True)
    clipped = group_loss(moved, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), loss_type="dapo",
                         epsilon=0.2, epsilon_high=0.2, total_sequences=1, total_tokens=1, max_completion_length=1)
    assert float(clipped.loss.detach()) == pytest.approx(-1.2) and float(clipped.clip_high) == 1.0
    clipped.loss.backward()
    assert moved.grad is not None and float(moved.grad) == 0.0
    # the shares of micro-batches add up to the whole batch's loss
    halves = sum(float(group_loss(logps[i:i + 1], logps[i:i + 1].detach(), adv[i:i + 1], mask[i:i + 1],
                                  loss_type="grpo", **kwargs).loss.detach()) for i in range(2))
    assert halves == pytest.approx(float(grpo.loss.detach()))


def test_kl_bias_correction_by_hand() -> None:
    """One token, advantage 0, beta 1, reference log-prob -1.2. Off-policy (old -1.5, ratio e^0.5) the k3
    value e^-0.2 + 0.2 - 1 = 0.018731 is scaled by the ratio; on-policy its value is unchanged but its
    gradient becomes log pi - log ref = 0.2 (the reverse-KL gradient) instead of 1 - e^-0.2 = 0.181269."""
    ref, zero, one = torch.tensor([[-1.2]]), torch.tensor([0.0]), torch.ones(1, 1)
    kwargs: dict[str, Any] = {"epsilon": 0.2, "epsilon_high": 0.2, "loss_type": "dapo", "total_sequences": 1,
                              "total_tokens": 1, "max_completion_length": 1, "beta": 1.0, "ref_logps": ref}
    off = group_loss(torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), zero, one, **kwargs)
    assert float(off.loss) == pytest.approx(0.018731 * 1.648721, abs=1e-5)
    grads = []
    for correction in (True, False):
        logp = torch.tensor([[-1.0]], requires_grad=True)
        out = group_loss(logp, logp.detach(), zero, one, kl_bias_correction=correction, **kwargs)
        assert float(out.loss.detach()) == pytest.approx(0.018731, abs=1e-5)
        out.loss.backward()
        assert logp.grad is not None
        grads.append(float(logp.grad))
    assert grads == pytest.approx([0.2, 0.181269], abs=1e-5)


def _trl_grpo(loss_type: str, beta: float, epsilon: float, epsilon_high: float, max_completion_length: int,
              bias_correction: bool = False) -> Any:
    """A ``GRPOTrainer`` with just what ``_compute_loss`` reads (one process, no accumulation)."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    identity = SimpleNamespace(reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                               gather_for_metrics=lambda t: t, num_processes=1, sync_gradients=True)
    trainer.__dict__.update({
        "loss_type": loss_type, "beta": beta, "epsilon_low": epsilon, "epsilon_high": epsilon_high,
        "importance_sampling_level": "token", "top_entropy_quantile": 1.0, "off_policy_mask_threshold": None,
        "use_vllm": False, "vllm_importance_sampling_correction": False, "aux_loss_enabled": False,
        "_entropy_bonus_enabled": False, "max_completion_length": max_completion_length,
        "current_gradient_accumulation_steps": 1, "accelerator": identity, "_metrics": defaultdict(
            lambda: defaultdict(list)), "model": SimpleNamespace(training=True),
        "args": SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1)})
    return trainer


@pytest.mark.parametrize(("loss_type", "beta", "epsilon_high", "correction"),
                         [("grpo", 0.0, 0.2, True), ("dr_grpo", 0.04, 0.2, False), ("dapo", 0.04, 0.28, False),
                          ("dapo", 0.04, 0.28, True), ("grpo", 0.04, 0.2, True), ("dapo", 0.0, 0.2, True)])
def test_group_loss_equals_trls_compute_loss(loss_type: str, beta: float, epsilon_high: float,
                                             correction: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    n, t = 6, 5
    logps = -torch.rand(n, t, generator=generator) * 3
    old = logps + torch.randn(n, t, generator=generator) * 0.3  # num_iterations > 1: the ratios move
    ref = logps + torch.randn(n, t, generator=generator) * 0.2
    mask = (torch.rand(n, t, generator=generator) > 0.2).long()
    mask[:, 0] = 1
    advantages = torch.randn(n, generator=generator)
    trainer = _trl_grpo(loss_type, beta, 0.2, epsilon_high, max_completion_length=t, bias_correction=correction)
    policy = logps.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (policy, torch.zeros(n, t), None)
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    theirs = trainer._compute_loss(None, inputs)
    theirs.backward()
    ours_logps = logps.clone().requires_grad_(True)
    ours = group_loss(ours_logps, old, advantages, mask, epsilon=0.2, epsilon_high=epsilon_high,
                      loss_type=loss_type, total_sequences=n, total_tokens=int(mask.sum()),
                      max_completion_length=t, beta=beta, ref_logps=ref, kl_bias_correction=correction)
    ours.loss.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    assert ours_logps.grad is not None and policy.grad is not None
    torch.testing.assert_close(ours_logps.grad, policy.grad, atol=1e-7, rtol=1e-5)
    metrics = trainer._metrics["train"]
    assert float(ours.clip_low) == pytest.approx(metrics["clip_ratio/low_mean"][-1], abs=1e-6)
    assert float(ours.clip_high) == pytest.approx(metrics["clip_ratio/high_mean"][-1], abs=1e-6)
    if beta:
        assert float(ours.kl) == pytest.approx(metrics["kl"][-1], abs=1e-6)


def test_rloo_loss_is_sequence_level_like_trls() -> None:
    """TRL's RLOO: ratio of whole-sequence probabilities, clipped per sequence, averaged over sequences."""
    logps = torch.tensor([[-1.0, -1.0], [-2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.5], [-2.0, -0.5]])
    mask = torch.ones(2, 2)
    out = rloo_loss(logps, old, torch.tensor([1.0, -1.0]), mask, epsilon=0.2, epsilon_high=0.2, total_sequences=2)
    # sequence 1: ratio e^0.5 = 1.6487 clipped to 1.2 (advantage > 0); sequence 2: ratio 1
    assert float(out.loss.detach()) == pytest.approx((-1.2 + 1.0) / 2, abs=1e-6)
    assert float(out.clip_high) == pytest.approx(0.5)
