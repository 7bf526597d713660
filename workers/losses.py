"""Preference and reward-model losses as pure functions of tensors.

No model code lives here: the training loops compute per-sequence log-probabilities
(``selective_log_softmax`` then ``sequence_logps``) and hand plain tensors to these functions, so every
loss can be unit-tested with known numbers.

The definitions follow TRL 1.16.0 (``trl/trainer/dpo_trainer.py``, ``trl/trainer/reward_trainer.py``),
installed as a dev-only reference; this module must never import ``trl``. Line numbers below refer to
that release. Where TRL 1.16 differs from older, commonly quoted forms (conservative DPO through
``label_smoothing`` in the sigmoid loss, un-normalised IPO, per-sequence RPO averaging), we follow TRL
and say so in the function's docstring.

Only the standard (reverse-KL) DPO family is covered: TRL's ``f_divergence_type``, ``ld_alpha`` and
``use_weighting`` options and its other loss types are not implemented.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOLossOutput",
    "SequenceLogps",
    "bradley_terry_loss",
    "dpo_loss",
    "dpo_metrics",
    "reward_metrics",
    "rpo_nll_loss",
    "selective_log_softmax",
    "sequence_logps",
]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo")

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class DPOLossOutput(NamedTuple):
    """Per-pair DPO losses and the implicit rewards.

    ``losses`` has shape ``[B]`` and carries gradients; the training loss is ``losses.mean()`` (TRL 1.16
    ``dpo_trainer.py`` L1528: ``loss += per_sequence_loss.mean() * loss_weight``). ``chosen_rewards`` and
    ``rejected_rewards`` are ``beta * (policy - reference)`` log-ratios, detached, shape ``[B]``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class SequenceLogps(NamedTuple):
    """Masked per-sequence sums of token log-probabilities and the number of tokens summed."""

    sums: Tensor
    counts: Tensor


# ----------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_token_counts: Tensor | None = None,
    rejected_token_counts: Tensor | None = None,
) -> DPOLossOutput:
    """Per-pair DPO loss for one of TRL 1.16's reverse-KL loss types.

    All four log-prob inputs are per-sequence sums over the completion tokens, shape ``[B]``. With
    ``rho_c = pc - rc`` and ``rho_r = pr - rr`` (policy minus reference) and ``logits = rho_c - rho_r``
    (TRL's ``delta_score``, ``dpo_trainer.py`` L1350-1354 and L1383):

    * ``"sigmoid"`` (L1387-1388): ``-logsigmoid(beta * logits)``. This is the DPO objective: the negative
      log-likelihood of the preference under a Bradley-Terry model whose reward is
      ``beta * log(pi / pi_ref)``. **TRL 1.16 ignores ``label_smoothing`` here**: the conservative-DPO
      term ``- logsigmoid(-beta*logits) * ls`` of older TRL releases is gone (``dpo_config.py`` documents
      ``label_smoothing`` as used only by Robust DPO and EXO). To never silently disagree with TRL, a
      non-zero ``label_smoothing`` with this loss raises ``ValueError``; use ``"robust"`` for noisy labels.
    * ``"robust"`` (L1428-1431):
      ``(-(1-ls) * logsigmoid(beta*logits) + ls * logsigmoid(-beta*logits)) / (1-2*ls)``.
      Robust DPO (Chowdhury et al., 2024) treats ``ls`` as the probability that a label was flipped;
      dividing by ``1 - 2*ls`` makes the loss an unbiased estimate of the clean-label loss. Needs
      ``0 <= ls < 0.5`` (TRL only logs a warning outside that range, L824-828; we raise).
    * ``"hinge"`` (L1390-1391): ``relu(1 - beta * logits)``, the SLiC hinge: zero once the scaled margin
      reaches 1, so pairs that are already well separated stop contributing gradient.
    * ``"ipo"`` (L1393-1404): ``(logits_avg - 1/(2*beta))**2`` with
      ``logits_avg = rho_c / n_c - rho_r / n_r``, where ``n_c``/``n_r`` are the completion token counts
      (clamped to at least 1). IPO regresses the margin onto a fixed target instead of pushing it to
      infinity, which avoids DPO's over-fitting on deterministic preferences. **TRL 1.16 length-normalises
      the log-ratios** (it says the IPO authors confirmed this form); the un-normalised paper form
      ``(logits - 1/(2*beta))**2`` is what you get by passing counts of ones. ``chosen_token_counts``
      and ``rejected_token_counts`` are therefore required for ``"ipo"`` and ignored by the other loss
      types. (TRL counts the unshifted completion mask; that equals the number of summed completion
      tokens whenever the prompt is non-empty.)

    The rewards are ``beta * rho_c`` and ``beta * rho_r``, detached (L1582-1583), whatever the loss type.

    Raises:
        ValueError: unknown ``loss_type``; ``beta <= 0``; ``label_smoothing`` outside ``[0, 0.5)`` for
            ``"robust"`` or non-zero for the other types; mismatched shapes; missing token counts for
            ``"ipo"``.
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps

    if loss_type == "sigmoid":
        losses = _sigmoid_loss(chosen_logratios - rejected_logratios, beta)
    elif loss_type == "robust":
        losses = _robust_loss(chosen_logratios - rejected_logratios, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = _hinge_loss(chosen_logratios - rejected_logratios, beta)
    else:  # "ipo", validated above
        losses = _ipo_loss(
            chosen_logratios, rejected_logratios, beta, chosen_token_counts, rejected_token_counts
        )

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def _sigmoid_loss(logits: Tensor, beta: float) -> Tensor:
    """``-logsigmoid(beta * logits)`` (TRL 1.16 L1388)."""
    return -F.logsigmoid(beta * logits)


def _robust_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO, written exactly as TRL 1.16 L1429-1431."""
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped = -label_smoothing * F.logsigmoid(-beta * logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def _hinge_loss(logits: Tensor, beta: float) -> Tensor:
    """``relu(1 - beta * logits)`` (TRL 1.16 L1391)."""
    return torch.relu(1 - beta * logits)


def _ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    chosen_token_counts: Tensor | None,
    rejected_token_counts: Tensor | None,
) -> Tensor:
    """Length-normalised IPO, TRL 1.16 L1398-1404."""
    if chosen_token_counts is None or rejected_token_counts is None:
        raise ValueError(
            "loss_type='ipo' needs chosen_token_counts and rejected_token_counts: TRL 1.16 divides each "
            "log-ratio by its completion length (pass ones for the un-normalised form of the IPO paper)"
        )
    _check_same_shape(
        chosen_logratios=chosen_logratios,
        chosen_token_counts=chosen_token_counts,
        rejected_token_counts=rejected_token_counts,
    )
    chosen_avg = chosen_logratios / chosen_token_counts.clamp(min=1.0)
    rejected_avg = rejected_logratios / rejected_token_counts.clamp(min=1.0)
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def _check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {list(DPO_LOSS_TYPES)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite positive number, got {beta}")
    if loss_type == "robust":
        if not (0.0 <= label_smoothing < 0.5):
            raise ValueError(
                f"label_smoothing must lie in [0.0, 0.5) for the 'robust' loss, got {label_smoothing}"
            )
    elif label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect on the {loss_type!r} loss in TRL 1.16 (it only "
            "enters Robust DPO); use loss_type='robust' for noisy preference labels"
        )


def rpo_nll_loss(chosen_token_logps_sum: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """Negative log-likelihood of the chosen completions, averaged over all chosen tokens in the batch.

    ``nll = -sum_i(chosen_token_logps_sum[i]) / sum_i(chosen_token_counts[i])``

    This is TRL 1.16's ``"sft"`` loss type (``dpo_trainer.py`` L1495-1502:
    ``-chosen_per_token_logps[chosen_mask.bool()].mean()``); TRL 1.16 has no ``rpo_alpha`` option, RPO is
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, sft_weight]``, i.e.
    ``loss = dpo_losses.mean() + sft_weight * nll``. Adding the NLL keeps the likelihood of the chosen answers
    from falling while DPO widens the chosen-rejected margin.

    **Normalisation (follows TRL):** a token-weighted mean over every chosen token in the batch, not a mean
    over pairs of per-sequence length-normalised NLLs, so long completions weigh more. The two agree only
    when all chosen completions have the same length.

    A batch with no chosen tokens returns 0 instead of TRL's NaN.
    """
    _check_same_shape(chosen_token_logps_sum=chosen_token_logps_sum, chosen_token_counts=chosen_token_counts)
    total_tokens = chosen_token_counts.sum().clamp(min=1).to(chosen_token_logps_sum.dtype)
    return -chosen_token_logps_sum.sum() / total_tokens


@torch.no_grad()
def dpo_metrics(
    out: DPOLossOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor
) -> dict[str, float]:
    """TRL 1.16's DPO reward metrics (``dpo_trainer.py`` L1581-1601), plus ``rewards/chosen_below_zero``.

    * ``rewards/chosen``, ``rewards/rejected``: mean implicit reward ``beta * (policy - ref)``.
    * ``rewards/accuracies``: share of pairs with ``chosen_reward > rejected_reward`` (ties count as wrong).
    * ``rewards/margins``: mean of ``chosen_reward - rejected_reward``.
    * ``logps/chosen``, ``logps/rejected``: mean policy sequence log-probability.
    * ``rewards/chosen_below_zero`` (not in TRL): share of pairs whose chosen log-ratio ``pc - rc`` is
      negative, i.e. the policy made the chosen answer *less* likely than the reference did. DPO can widen
      the margin while lowering both likelihoods; this flags it. Read off ``chosen_rewards < 0``, the same
      thing since ``beta > 0``.

    TRL averages after gathering across processes; here the means are over the tensors given, so gather first
    under data parallelism.
    """
    chosen_rewards = out.chosen_rewards.float()
    rejected_rewards = out.rejected_rewards.float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
        "rewards/chosen_below_zero": (chosen_rewards < 0).float().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Scalar Bradley-Terry reward-model loss, as TRL 1.16's ``RewardTrainer.compute_loss``.

    ``loss = -logsigmoid(r_chosen - r_rejected - margin).mean()
    + center_rewards_coefficient * mean((r_chosen + r_rejected)**2)``
    (``reward_trainer.py`` L789-795).

    The first term is the NLL of the observed preference when ``P(chosen > rejected) = sigmoid(r+ - r-)``;
    a ``margin`` (shape ``[B]``, e.g. from graded preference strength as in Llama 2) asks the chosen reward
    to win by at least that much. Bradley-Terry is invariant to adding a constant to every reward, so the
    optional centring term (Eisenstein et al., 2023) pins the rewards near zero mean, which keeps them
    comparable across runs and usable as a PPO signal. ``None`` for either option leaves that term out.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        _check_same_shape(chosen_rewards=chosen_rewards, margin=margin)
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


@torch.no_grad()
def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Reward-model metrics, defined as TRL 1.16's ``RewardTrainer`` (``reward_trainer.py`` L803-815).

    * ``accuracy``: share of pairs with ``r_chosen > r_rejected`` (ties count as wrong).
    * ``margin``: mean of ``r_chosen - r_rejected``.
    * ``reward/mean``, ``reward/min``, ``reward/max``: over chosen and rejected rewards together. TRL logs
      these as ``mean_reward``, ``min_reward`` and ``max_reward``.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen = chosen_rewards.detach().float()
    rejected = rejected_rewards.detach().float()
    all_rewards = torch.cat([chosen.reshape(-1), rejected.reshape(-1)])
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "reward/mean": all_rewards.mean().item(),
        "reward/min": all_rewards.min().item(),
        "reward/max": all_rewards.max().item(),
    }


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------------------


def selective_log_softmax(logits: Tensor, index: Tensor, *, chunk_rows: int = 1024) -> Tensor:
    """``log_softmax(logits, -1).gather(-1, index)`` without materialising the full log-softmax.

    ``logits`` has shape ``[..., V]`` and ``index`` (integer) shape ``[...]``; returns ``log p(index)``
    with shape ``[...]``, computed as ``logits[index] - logsumexp(logits)`` over chunks of ``chunk_rows``
    positions. The forward pass then holds one ``[chunk_rows, V]`` fp32 block at a time instead of a full
    ``[..., V]`` log-softmax copy, which with a large vocabulary is as big as the logits themselves.
    Non-contiguous slices such as ``logits[:, :-1]`` are walked along their leading dim, never copied.

    bf16/fp16 logits are upcast to fp32 chunk by chunk (a bf16 logsumexp loses the bits that separate the
    log-probabilities of likely tokens) and the result is **fp32**, so that summing it over long sequences
    does not round either. fp32/fp64 logits keep their dtype. Gradients flow to ``logits``.

    ``index`` must hold valid token ids: replace ignore labels (e.g. -100) with any valid id first and mask
    the result (see ``sequence_logps``). TRL's counterpart is ``trl.trainer.utils.selective_log_softmax``
    (L538), which keeps bf16 output.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if logits.numel() == 0:
        out_dtype = torch.float32 if logits.dtype in _LOW_PRECISION else logits.dtype
        return logits.new_empty(index.shape, dtype=out_dtype)
    try:
        rows = logits.view(-1, logits.shape[-1])
    except RuntimeError:
        # A sliced tensor such as ``logits[:, :-1]`` cannot be flattened without a full copy: go one
        # leading index at a time instead.
        pairs = zip(logits, index, strict=True)
        return torch.stack([selective_log_softmax(sub, idx, chunk_rows=chunk_rows) for sub, idx in pairs])
    row_index = index.reshape(-1, 1).long()
    chunks = [
        _chunk_logps(rows[start : start + chunk_rows], row_index[start : start + chunk_rows])
        for start in range(0, rows.shape[0], chunk_rows)
    ]
    return torch.cat(chunks).reshape(index.shape)


def _chunk_logps(logits: Tensor, index: Tensor) -> Tensor:
    """``logits[index] - logsumexp(logits)`` for one ``[rows, V]`` block, in fp32 for half-precision input."""
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(per_token_logps: Tensor, mask: Tensor) -> SequenceLogps:
    """Sum per-token log-probabilities over the positions where ``mask`` is non-zero, along the last dim.

    ``per_token_logps`` and ``mask`` have shape ``[B, T]`` (the completion mask already shifted to line up
    with the next-token log-probs). Returns ``sums`` (shape ``[B]``, the sequence log-probability DPO
    compares, TRL 1.16 L1304) and ``counts`` (shape ``[B]``, the completion lengths that IPO and
    ``rpo_nll_loss`` divide by). Masked positions are zeroed with ``where``, not multiplied, so a ``-inf``
    or NaN at a padded position cannot leak into the sum.
    """
    _check_same_shape(per_token_logps=per_token_logps, mask=mask)
    keep = mask.bool()
    sums = torch.where(keep, per_token_logps, torch.zeros_like(per_token_logps)).sum(dim=-1)
    return SequenceLogps(sums=sums, counts=keep.sum(dim=-1))


def _check_same_shape(**tensors: Tensor) -> None:
    """Refuse silently broadcasting operands: a ``[B]`` minus a ``[B, 1]`` would give ``[B, B]``."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")
