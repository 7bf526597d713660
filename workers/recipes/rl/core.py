"""Online RL as small pure functions of tensors (no model code), each with known-answer tests: PPO's
(GAE, clipped policy and value losses, KL estimators and controllers) and the critic-free methods'
(GRPO's group-relative advantages and its ``grpo`` / ``dr_grpo`` / ``dapo`` normalisations, RLOO's
leave-one-out baseline and sequence-level loss), the latter as in TRL 1.16's ``GRPOTrainer`` and
``RLOOTrainer`` (``test_ppo_core.py`` and ``test_group_core.py`` check them on the same tensors).

Shapes: a rollout is ``B`` responses of up to ``T`` tokens; per-token tensors are ``[B, T]`` and
``mask`` (bool or 0/1) marks real response tokens — everything up to and including the first EOS.
Masked positions are zeroed with ``where`` (never multiplied), so a NaN or ``inf`` at a padded
position cannot leak into a sum.

The definitions follow TRL's PPO trainer (``trl/trainer/ppo_trainer.py``, 0.x releases before it
was removed) and the "N implementation details of RLHF with PPO" write-up, with two deliberate
choices spelled out where they are made: the approximate KL is Schulman's ``(r - 1) - log r``
(TRL logs ``0.5 * log(r)^2``), and ``masked_var`` is unbiased like TRL's.

References: Schulman, "Approximating KL Divergence" (k1, k3); Schulman et al. 2016 (GAE);
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (adaptive KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "GroupLoss",
    "FixedKLController",
    "NanGuard",
    "PolicyLoss",
    "ValueLoss",
    "apply_missing_eos_penalty",
    "approx_kl",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "group_loss",
    "nanstd",
    "kl_estimate",
    "kl_k1",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "response_mask",
    "reward_hacking",
    "rloo_advantages",
    "rloo_loss",
    "sequence_kl",
    "value_loss",
]


# --------------------------------------------------------------------------- masked reductions


def _keep(mask: Tensor) -> Tensor:
    return mask.bool()


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    kept = torch.where(_keep(mask), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the kept positions (0 where nothing is kept, instead of NaN)."""
    count = _keep(mask).sum() if dim is None else _keep(mask).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all kept positions; unbiased (Bessel) like TRL's ``masked_var``."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = _keep(mask).sum()
        if n < 2:
            return torch.zeros_like(var)
        var = var * n / (n - 1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the kept positions; 0 at masked ones.

    ``shift_mean=False`` adds the mean back (scale only), as TRL does when whitening rewards.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_keep(mask), whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------- responses


def response_mask(responses: Tensor, eos_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Truncation after EOS: ``(mask, has_eos)`` for generated token ids ``[B, T]``.

    ``mask`` keeps every token up to and including the first EOS (the EOS is a token the policy
    chose, so it is scored and trained); ``has_eos`` says whether a row produced one at all.
    """
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for token in eos_token_ids:
        is_eos |= responses == token
    # eos_before[t] = number of EOS strictly before t; keep t while it is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return eos_before == 0, is_eos.any(dim=1)


# --------------------------------------------------------------------------- KL and rewards


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """``log p - log p_ref``: unbiased per sampled token, can be negative."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """``(r - 1) - log r`` with ``r = p_ref / p``: unbiased, never negative, lower variance."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str) -> Tensor:
    if estimator == "k1":
        return kl_k1(logps, ref_logps)
    if estimator == "k3":
        return kl_k3(logps, ref_logps)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def apply_missing_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float | None) -> Tensor:
    """Subtract ``penalty`` from the score of every response that never produced EOS."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def per_token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """``(rewards, non_score_rewards)``, both ``[B, T]`` and 0 at masked positions.

    Every response token gets ``-kl_coef * kl``; the last real token also gets the sequence score.
    Every row must have at least one real token.
    """
    keep = _keep(mask)
    lengths = keep.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one token")
    non_score = torch.where(keep, -kl_coef * kl, torch.zeros_like(kl))
    rewards = non_score.clone()
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards, non_score


# --------------------------------------------------------------------------- advantages


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: ``(advantages, returns)``, 0 at masked positions.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    the value after a response's last real token is 0 (the episode ends there). ``returns = A + V``
    are the value targets.
    """
    keep = _keep(mask)
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    values = torch.where(keep, values, torch.zeros_like(values))
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# --------------------------------------------------------------------------- losses


class PolicyLoss(NamedTuple):
    loss: Tensor      # scalar with gradients: masked mean of max(-A r, -A clip(r))
    clipfrac: Tensor  # share of tokens where the clipped term was the larger one
    approxkl: Tensor  # mean of (r - 1) - log r, old -> new
    ratio: Tensor     # mean ratio


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate, token-level, averaged over the mini-batch's real tokens."""
    log_ratio = torch.where(_keep(mask), logps - old_logps, torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), mask)
        kl = approx_kl(logps.detach(), old_logps, mask)
        mean_ratio = masked_mean(ratio.detach(), mask)
    return PolicyLoss(loss, clipfrac, kl, mean_ratio)


class ValueLoss(NamedTuple):
    loss: Tensor      # 0.5 * masked mean of max((v - R)^2, (clip(v) - R)^2)
    clipfrac: Tensor


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> ValueLoss:
    """Clipped value loss: predictions may move at most ``cliprange_value`` from the rollout's."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLoss(loss, clipfrac)


def approx_kl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """Schulman's k3 between the rollout policy and the current one: mean of ``(r - 1) - log r``."""
    log_ratio = torch.where(_keep(mask), logps - old_logps, torch.zeros_like(logps))
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over real tokens (NaN when returns are constant)."""
    var_returns = float(masked_var(returns, mask))
    if var_returns == 0.0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask)) / var_returns


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy ``[...]`` of ``softmax(logits)`` (fp32 for half-precision logits)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# --------------------------------------------------------------------------- KL coefficient


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed coefficient does not move."""


class AdaptiveKLController:
    """Ziegler et al. (2019): ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon``.

    ``current_kl`` is the mean per-sequence KL of a rollout and ``n_steps`` the number of episodes
    in it: over ``horizon`` episodes beta can change by at most ~e^{+-0.2}.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10_000) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- alarms


class NanGuard:
    """Counts non-finite losses; a step whose loss is not finite is skipped by the caller.

    ``check(loss)`` returns True for a finite loss; for a non-finite one it counts it and returns
    False, and raises ``FloatingPointError`` once ``limit`` such losses were seen.
    """

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.count = 0

    def check(self, loss: float) -> bool:
        if math.isfinite(loss):
            return True
        self.count += 1
        if self.count >= self.limit:
            raise FloatingPointError(f"{self.count} non-finite losses (the last was {loss})")
        return False


def reward_hacking(scores: Sequence[float], kls: Sequence[float], kl_bound: float, window: int = 3) -> bool:
    """Reward rising while KL explodes, judged on the last ``window`` + 1 rollouts.

    True when the mean score went up over the window while the KL went up by more than half of
    ``kl_bound`` and now exceeds the bound: the policy is buying reward by leaving the reference.
    """
    if len(scores) <= window or len(kls) <= window:
        return False
    score_then, score_now = scores[-window - 1], scores[-1]
    kl_then, kl_now = kls[-window - 1], kls[-1]
    return score_now > score_then and kl_now > kl_bound and kl_now - kl_then > 0.5 * kl_bound


# --------------------------------------------------------------------------- critic-free: GRPO and RLOO


def nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN for fewer than two values), as TRL's."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, math.nan))
    std = variance.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> tuple[Tensor, Tensor]:
    """GRPO: ``(r - mean of its group) / (std + 1e-4)``; rows ``b*G .. b*G+G-1`` are prompt ``b``'s group.

    ``scale`` "group" divides by the group's std, "batch" by the whole batch's, "none" not at all.
    Returns (advantages, the std each row was judged by — zero marks a group with no signal). A NaN
    reward (an unscorable sample) is left out of its group's statistics and gets advantage 0.
    """
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.nan_to_num(std, nan=0.0)


def rloo_advantages(rewards: Tensor, group_size: int, normalize: bool = False) -> Tensor:
    """RLOO: each reward minus the mean of its group's *other* rewards (optionally normalised over the batch)."""
    grouped = rewards.view(-1, group_size)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    advantages = rewards - baseline.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


class GroupLoss(NamedTuple):
    loss: Tensor       # this micro-batch's share of the step's loss (sum the shares over micro-batches)
    kl: Tensor         # masked mean of the per-token KL (0 without a reference)
    clip_low: Tensor   # share of tokens clipped below (ratio < 1 - epsilon, advantage < 0)
    clip_high: Tensor  # share clipped above (ratio > 1 + epsilon_high, advantage > 0)
    tokens: Tensor     # tokens in the micro-batch's mask


def group_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float,
               epsilon_high: float, loss_type: str, total_sequences: int, total_tokens: int,
               max_completion_length: int, beta: float = 0.0, ref_logps: Tensor | None = None,
               kl_bias_correction: bool = True) -> GroupLoss:
    """GRPO's clipped surrogate per token plus ``beta`` x k3 KL, normalised as ``loss_type`` says over the
    *whole step's* batch (``total_sequences`` completions holding ``total_tokens`` tokens):

    - ``grpo``: mean over sequences of each sequence's token mean (DeepSeekMath);
    - ``dr_grpo``: token sum / (sequences x ``max_completion_length``) (Dr. GRPO: no length bias);
    - ``dapo``: token sum / tokens (DAPO: every token weighs the same).

    Each micro-batch returns its share, so the step's loss is the sum over micro-batches whatever the split.

    ``kl_bias_correction`` multiplies the k3 term by the (differentiable) importance ratio, as TRL 1.16
    does by default (``use_bias_correction_kl``, DeepSeek-V3.2): its gradient is then the unbiased
    reverse-KL gradient even on-policy, where the ratio's value is 1 but its gradient is not 0.
    """
    keep = _keep(mask)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(per_token)
    if beta != 0.0 and ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
    summed = masked_sum(per_token, keep, dim=1)
    if loss_type == "grpo":
        loss = (summed / keep.sum(dim=1).clamp(min=1)).sum() / total_sequences
    elif loss_type == "dr_grpo":
        loss = summed.sum() / (total_sequences * max_completion_length)
    elif loss_type == "dapo":
        loss = summed.sum() / max(total_tokens, 1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    return GroupLoss(loss, masked_mean(kl, keep).detach(), masked_mean(low.float(), keep).detach(),
                     masked_mean(high.float(), keep).detach(), keep.sum())


def rloo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float,
              epsilon_high: float, total_sequences: int) -> GroupLoss:
    """RLOO's sequence-level clipped surrogate (TRL's ``RLOOTrainer``): the ratio of whole-sequence
    probabilities, one term per completion, averaged over the step's completions."""
    keep = _keep(mask)
    ratio = torch.exp(masked_sum(logps, keep, dim=1) - masked_sum(old_logps, keep, dim=1))
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).sum() / total_sequences
    low = ((ratio < 1 - epsilon) & (advantages < 0)).float().mean()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float().mean()
    return GroupLoss(loss, torch.zeros(()), low.detach(), high.detach(), keep.sum())


def sequence_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """RLOO's per-sequence KL for the reward penalty: the k1 log-ratio summed over the completion."""
    return masked_sum(logps - ref_logps, mask, dim=1)
