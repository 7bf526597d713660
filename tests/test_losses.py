"""Known-answer tests for workers/losses.py, plus a cross-check against TRL 1.16's own loss code.

Expected values are literals worked out by hand with ``math`` (the derivation is in the comment next to each);
they are never recomputed with the function under test. Helpers: ``softplus(x) = log(1 + e^x)`` and
``-logsigmoid(z) = softplus(-z)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from workers.losses import (
    DPOLossOutput,
    bradley_terry_loss,
    dpo_loss,
    dpo_metrics,
    reward_metrics,
    rpo_nll_loss,
    selective_log_softmax,
    sequence_logps,
)

LN2 = 0.6931471805599453  # math.log(2)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-12, abs=1e-12)


# The pair of the brief: pc=-1.0, pr=-2.0, rc=rr=-1.5.
# rho_c = pc - rc = 0.5, rho_r = pr - rr = -0.5, logits = rho_c - rho_r = 1.0.
# (The brief said logits = 1.5 and loss 0.62096 = softplus(-0.15); the arithmetic gives 1.0.)
# Order: (policy_chosen, policy_rejected, ref_chosen, ref_rejected).
Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
PAIR: Pair = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
# The same pair with chosen and rejected swapped: logits = -1.0.
SWAPPED: Pair = (t(-2.0), t(-1.0), t(-1.5), t(-1.5))


def loss_of(pair: Pair, **kwargs: Any) -> float:
    return dpo_loss(*pair, **kwargs).losses.item()


def grad_of(x: torch.Tensor) -> torch.Tensor:
    assert x.grad is not None
    return x.grad


# ---------------------------------------------------------------------------------------------------------
# sigmoid
# ---------------------------------------------------------------------------------------------------------


def test_sigmoid_known_answer() -> None:
    # -logsigmoid(0.1 * 1.0) = log(1 + e^-0.1)
    assert loss_of(PAIR, beta=0.1) == approx(0.6443966600735709)
    # beta = 1: log(1 + e^-1)
    assert loss_of(PAIR, beta=1.0) == approx(0.31326168751822286)
    # wrong way round: log(1 + e^0.1)
    assert loss_of(SWAPPED, beta=0.1) == approx(0.744396660073571)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_sigmoid_is_ln2_when_policy_equals_reference(beta: float) -> None:
    logps = t(-3.0, -0.25, -12.5)
    out = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=beta)
    assert out.losses.tolist() == [approx(LN2)] * 3
    assert out.chosen_rewards.tolist() == [0.0] * 3
    assert out.rejected_rewards.tolist() == [0.0] * 3


def test_rewards_are_beta_times_log_ratio_and_detached() -> None:
    pc, pr, rc, rr = (x.clone().requires_grad_(True) for x in PAIR)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert isinstance(out, DPOLossOutput)
    assert out.chosen_rewards.item() == approx(0.05)  # 0.1 * 0.5
    assert out.rejected_rewards.item() == approx(-0.05)  # 0.1 * -0.5
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    # d/dpc softplus(-beta * logits) = -beta * sigmoid(-beta * logits) = -0.1 * sigmoid(-0.1)
    assert grad_of(pc).item() == approx(-0.047502081252106004)
    assert grad_of(pr).item() == approx(0.047502081252106004)
    assert grad_of(rc).item() == approx(0.047502081252106004)
    assert grad_of(rr).item() == approx(-0.047502081252106004)


def test_sigmoid_is_per_pair() -> None:
    out = dpo_loss(t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -1.5), t(-1.5, -1.5), beta=0.1)
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == [approx(0.6443966600735709), approx(0.744396660073571)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_label_smoothing_is_refused_where_trl_ignores_it(loss_type: str) -> None:
    # TRL 1.16 has no conservative DPO: label_smoothing only enters the robust (and EXO) loss.
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, beta=0.1, loss_type=loss_type, label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------------------
# robust
# ---------------------------------------------------------------------------------------------------------


def test_robust_known_answer() -> None:
    # ls = 0.1, z = 0.1: (0.9 * softplus(-0.1) - 0.1 * softplus(0.1)) / 0.8
    #   = (0.9 * 0.6443966600735709 - 0.1 * 0.744396660073571) / 0.8 = 0.6318966600735709
    # (softplus(z) = softplus(-z) + z, so this is softplus(-0.1) - 0.1 * 0.1 / 0.8 = sigmoid loss - 0.0125)
    assert loss_of(PAIR, beta=0.1, loss_type="robust", label_smoothing=0.1) == approx(0.6318966600735709)
    # ls = 0.25, z = 1.0: (0.75 * softplus(-1) - 0.25 * softplus(1)) / 0.5 = softplus(-1) - 0.5
    assert loss_of(PAIR, beta=1.0, loss_type="robust", label_smoothing=0.25) == approx(-0.18673831248177714)


def test_robust_without_smoothing_is_sigmoid() -> None:
    assert loss_of(PAIR, beta=0.1, loss_type="robust") == approx(0.6443966600735709)


@pytest.mark.parametrize("label_smoothing", [0.5, 0.7, -0.1, float("nan")])
def test_robust_rejects_invalid_label_smoothing(label_smoothing: float) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, beta=0.1, loss_type="robust", label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------------------
# hinge
# ---------------------------------------------------------------------------------------------------------


def test_hinge_both_sides() -> None:
    # relu(1 - 0.1 * 1.0) = 0.9: inside the hinge
    assert loss_of(PAIR, beta=0.1, loss_type="hinge") == approx(0.9)
    # relu(1 - 0.1 * -1.0) = 1.1: wrong way round
    assert loss_of(SWAPPED, beta=0.1, loss_type="hinge") == approx(1.1)
    # relu(1 - 2.0 * 1.0) = relu(-1) = 0: past the hinge
    assert loss_of(PAIR, beta=2.0, loss_type="hinge") == 0.0
    # relu(1 - 1.0 * 1.0) = 0: exactly at the hinge
    assert loss_of(PAIR, beta=1.0, loss_type="hinge") == 0.0


def test_hinge_has_no_gradient_past_the_hinge() -> None:
    pc = t(-1.0).requires_grad_(True)
    dpo_loss(pc, t(-2.0), t(-1.5), t(-1.5), beta=2.0, loss_type="hinge").losses.sum().backward()
    assert grad_of(pc).item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# ipo
# ---------------------------------------------------------------------------------------------------------


def test_ipo_known_answer() -> None:
    ones = t(1.0)
    # counts of one give the paper's form: (1.0 - 1 / (2 * 0.1))^2 = (1 - 5)^2 = 16
    assert loss_of(
        PAIR, beta=0.1, loss_type="ipo", chosen_token_counts=ones, rejected_token_counts=ones
    ) == approx(16.0)
    # TRL normalises by length: 0.5 / 2 - (-0.5) / 4 = 0.375; (0.375 - 5)^2 = 21.390625
    assert loss_of(
        PAIR, beta=0.1, loss_type="ipo", chosen_token_counts=t(2.0), rejected_token_counts=t(4.0)
    ) == approx(21.390625)
    # integer counts work; a zero count is clamped to 1 as in TRL. beta = 1:
    # 0.5 / 1 - (-0.5) / 1 = 1.0; (1.0 - 1 / 2)^2 = 0.25
    assert loss_of(
        PAIR,
        beta=1.0,
        loss_type="ipo",
        chosen_token_counts=torch.tensor([0]),
        rejected_token_counts=torch.tensor([1]),
    ) == approx(0.25)


def test_ipo_is_zero_at_its_target_margin() -> None:
    # target: logits_avg = 1 / (2 * beta); beta = 0.5 -> 1.0, which PAIR has with counts of one
    ones = t(1.0)
    assert (
        loss_of(PAIR, beta=0.5, loss_type="ipo", chosen_token_counts=ones, rejected_token_counts=ones) == 0.0
    )


def test_ipo_needs_token_counts() -> None:
    with pytest.raises(ValueError, match="token_counts"):
        dpo_loss(*PAIR, beta=0.1, loss_type="ipo")


# ---------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------


def test_unknown_loss_type() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*PAIR, beta=0.1, loss_type="kto")


@pytest.mark.parametrize("beta", [0.0, -0.1, float("inf")])
def test_invalid_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*PAIR, beta=beta)


def test_shape_mismatch_is_refused() -> None:
    # [2] minus [2, 1] would silently broadcast to [2, 2]
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(t(-1.0, -2.0), t(-1.0, -2.0), t(-1.0, -2.0).unsqueeze(1), t(-1.0, -2.0), beta=0.1)


# ---------------------------------------------------------------------------------------------------------
# RPO / SFT term
# ---------------------------------------------------------------------------------------------------------


def test_rpo_nll_is_token_weighted_like_trl() -> None:
    # sequences: 3 tokens summing to -6.0, 1 token summing to -1.0
    # TRL: -(-6 - 1) / (3 + 1) = 1.75; a mean of per-sequence means would give (2 + 1) / 2 = 1.5
    assert rpo_nll_loss(t(-6.0, -1.0), torch.tensor([3, 1])).item() == approx(1.75)


def test_rpo_nll_equal_lengths_and_empty() -> None:
    # equal lengths: both normalisations agree, -(-2 - 4) / (2 + 2) = 1.5
    assert rpo_nll_loss(t(-2.0, -4.0), t(2.0, 2.0)).item() == approx(1.5)
    # no chosen tokens: 0, not NaN
    assert rpo_nll_loss(t(0.0), torch.tensor([0])).item() == 0.0


def test_rpo_nll_has_gradient() -> None:
    sums = t(-6.0, -1.0).requires_grad_(True)
    rpo_nll_loss(sums, torch.tensor([3, 1])).backward()
    assert grad_of(sums).tolist() == [approx(-0.25), approx(-0.25)]  # d/ds of -(s1 + s2) / 4


# ---------------------------------------------------------------------------------------------------------
# DPO metrics
# ---------------------------------------------------------------------------------------------------------


def test_dpo_metrics_known_answer() -> None:
    # beta = 0.5
    # pc = [-1, -3, -2, -3], rc = [-1.5, -2, -2.5, -4]
    #   -> rho_c = [0.5, -1, 0.5, 1], r_c = [0.25, -0.5, 0.25, 0.5]
    # pr = [-2, -1, -2, -6], rr = [-1.5, -1.5, -2.5, -5]
    #   -> rho_r = [-0.5, 0.5, 0.5, -1], r_r = [-0.25, 0.25, 0.25, -0.5]
    pc, rc = t(-1.0, -3.0, -2.0, -3.0), t(-1.5, -2.0, -2.5, -4.0)
    pr, rr = t(-2.0, -1.0, -2.0, -6.0), t(-1.5, -1.5, -2.5, -5.0)
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert dpo_metrics(out, pc, pr) == {
        "rewards/chosen": approx(0.125),  # 0.5 / 4
        "rewards/rejected": approx(-0.0625),  # -0.25 / 4
        "rewards/accuracies": approx(0.5),  # [yes, no, tie = no, yes]
        "rewards/margins": approx(0.1875),  # [0.5, -0.75, 0, 1] / 4
        "logps/chosen": approx(-2.25),  # -9 / 4
        "logps/rejected": approx(-2.75),  # -11 / 4
        "rewards/chosen_below_zero": approx(0.25),  # only rho_c = -1
    }


def test_dpo_metrics_are_plain_floats() -> None:
    pc, pr, rc, rr = (x.float().requires_grad_(True) for x in PAIR)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    metrics = dpo_metrics(out, pc, pr)
    assert all(type(v) is float for v in metrics.values())


# ---------------------------------------------------------------------------------------------------------
# Bradley-Terry reward model
# ---------------------------------------------------------------------------------------------------------

R_CHOSEN, R_REJECTED = t(1.0, 0.5), t(0.0, 1.0)  # differences [1.0, -0.5]


def test_bradley_terry_plain() -> None:
    # (softplus(-1.0) + softplus(0.5)) / 2 = (0.31326168751822286 + 0.9740769841801067) / 2
    assert bradley_terry_loss(R_CHOSEN, R_REJECTED).item() == approx(0.6436693358491647)


def test_bradley_terry_equal_rewards_is_ln2() -> None:
    assert bradley_terry_loss(t(0.3, -2.0), t(0.3, -2.0)).item() == approx(LN2)


def test_bradley_terry_with_margin() -> None:
    # differences minus margin [0.5, 0.0] -> [0.5, -0.5]: (softplus(-0.5) + softplus(0.5)) / 2
    assert bradley_terry_loss(R_CHOSEN, R_REJECTED, margin=t(0.5, 0.0)).item() == approx(0.7240769841801067)


def test_bradley_terry_with_centering() -> None:
    # sums [1.0, 1.5] -> mean of squares (1 + 2.25) / 2 = 1.625; coefficient 0.01 adds 0.01625
    loss = bradley_terry_loss(R_CHOSEN, R_REJECTED, center_rewards_coefficient=0.01)
    assert loss.item() == approx(0.6599193358491647)  # 0.6436693358491647 + 0.01625


def test_bradley_terry_with_margin_and_centering() -> None:
    loss = bradley_terry_loss(R_CHOSEN, R_REJECTED, margin=t(0.5, 0.0), center_rewards_coefficient=0.01)
    assert loss.item() == approx(0.7403269841801067)  # 0.7240769841801067 + 0.01625


def test_bradley_terry_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(R_CHOSEN, R_REJECTED.unsqueeze(1))


def test_reward_metrics_known_answer() -> None:
    assert reward_metrics(R_CHOSEN, R_REJECTED) == {
        "accuracy": approx(0.5),  # 1 > 0 yes, 0.5 > 1 no
        "margin": approx(0.25),  # (1.0 - 0.5) / 2
        "reward/mean": approx(0.625),  # (1 + 0.5 + 0 + 1) / 4
        "reward/min": approx(0.0),
        "reward/max": approx(1.0),
    }


# ---------------------------------------------------------------------------------------------------------
# log-probabilities
# ---------------------------------------------------------------------------------------------------------


def naive_logps(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_known_answer() -> None:
    # logits [0, ln 3] -> p = [1/4, 3/4]
    logits = t(0.0, math.log(3.0)).repeat(2, 1)
    out = selective_log_softmax(logits, torch.tensor([1, 0]))
    assert out.tolist() == [approx(-0.2876820724517809), approx(-1.3862943611198906)]  # ln 0.75, ln 0.25


@pytest.mark.parametrize("chunk_rows", [1, 3, 1024])
def test_selective_log_softmax_matches_log_softmax_fp32(chunk_rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen) * 4
    index = torch.randint(0, 50, (3, 7), generator=gen)
    out = selective_log_softmax(logits, index, chunk_rows=chunk_rows)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logps(logits, index), rtol=1e-5, atol=1e-5)


def test_selective_log_softmax_bf16_is_computed_in_fp32() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 9, 300, generator=gen) * 6).to(torch.bfloat16)
    index = torch.randint(0, 300, (4, 9), generator=gen)
    out = selective_log_softmax(logits, index, chunk_rows=5)
    assert out.dtype == torch.float32
    # exact up to fp32 rounding against the fp32 reference on the same (bf16-rounded) logits ...
    torch.testing.assert_close(out, naive_logps(logits.float(), index), rtol=1e-5, atol=1e-5)
    # ... and within bf16 resolution of a bf16 log_softmax + gather
    torch.testing.assert_close(out, naive_logps(logits, index).float(), rtol=2e-2, atol=0.25)


def test_selective_log_softmax_gradient_matches() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 5, 13, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 13, (2, 5), generator=gen)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    selective_log_softmax(a, index, chunk_rows=4).sum().backward()
    naive_logps(b, index).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_selective_log_softmax_on_a_non_contiguous_slice() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 17, generator=gen)
    sliced = logits[:, :-1, :]  # what a causal LM shift produces
    index = torch.randint(0, 17, (2, 5), generator=gen)
    torch.testing.assert_close(selective_log_softmax(sliced, index, chunk_rows=2), naive_logps(sliced, index))


def test_selective_log_softmax_shape_checks() -> None:
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    assert selective_log_softmax(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)


def test_sequence_logps_masks_padding() -> None:
    per_token = t(-0.5, -1.0, -float("inf"), -0.25, -2.0, float("nan")).reshape(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    sums, counts = sequence_logps(per_token, mask)
    assert sums.tolist() == [-1.5, -2.25]
    assert counts.tolist() == [2, 2]


# ---------------------------------------------------------------------------------------------------------
# cross-check against TRL 1.16's own code
# ---------------------------------------------------------------------------------------------------------
#
# TRL has no free loss function: the losses live inline in DPOTrainer._compute_loss and
# RewardTrainer.compute_loss. Both only touch a handful of attributes of ``self`` and ask the model for
# ready-made outputs, so they are called unbound on a stub ``self`` and a stub model that returns given
# per-token log-probabilities (or rewards). No model, tokenizer, dataset or Trainer is built.


def _trl_module(name: str) -> Any:
    trl = pytest.importorskip("trl")
    if not trl.__version__.startswith("1.16."):
        pytest.skip(f"the stubs below follow TRL 1.16 internals; installed TRL is {trl.__version__}")
    return pytest.importorskip(name)


def _stub_accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _random_preference_batch(n_pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows; position 0 is the prompt, then 1..n completion tokens, then padding."""
    gen = torch.Generator().manual_seed(seed)
    total_len = 9
    lengths = torch.randint(1, total_len, (2 * n_pairs,), generator=gen)
    positions = torch.arange(total_len).unsqueeze(0)
    completion_mask = ((positions >= 1) & (positions <= lengths.unsqueeze(1))).long()
    shift_mask = completion_mask[:, 1:]
    per_token = torch.where(
        shift_mask.bool(),
        -torch.rand(2 * n_pairs, total_len - 1, generator=gen, dtype=torch.float64) * 3,
        0.0,
    )
    ref = -torch.rand(2 * n_pairs, generator=gen, dtype=torch.float64) * 3 * lengths
    return {"completion_mask": completion_mask, "per_token": per_token, "ref": ref}


def _trl_dpo(batch: dict[str, torch.Tensor], loss_types: list[str], weights: list[float], **cfg: Any):
    dpo_trainer = _trl_module("trl.trainer.dpo_trainer")
    n_rows, total_len = batch["completion_mask"].shape
    stub_self = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_stub_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **cfg,
    )
    zeros = torch.zeros(n_rows, total_len - 1)

    def stub_model(**_: Any) -> SimpleNamespace:
        return SimpleNamespace(
            log_probs=batch["per_token"], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    inputs = {
        "input_ids": torch.zeros(n_rows, total_len, dtype=torch.long),
        "attention_mask": torch.ones(n_rows, total_len, dtype=torch.long),
        "completion_mask": batch["completion_mask"],
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(stub_self, stub_model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stub_self._metrics["train"].items()}


def _ours(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sums, counts = sequence_logps(batch["per_token"], batch["completion_mask"][:, 1:])
    pc, pr = sums.chunk(2)
    nc, nr = counts.chunk(2)
    rc, rr = batch["ref"].chunk(2)
    return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "nc": nc, "nr": nr}


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 2.0, 0.0),
        ("robust", 0.1, 0.2),
        ("robust", 0.5, 0.0),
        ("hinge", 0.1, 0.0),
        ("hinge", 1.0, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 1.0, 0.0),
    ],
)
def test_dpo_loss_matches_trl(loss_type: str, beta: float, label_smoothing: float) -> None:
    batch = _random_preference_batch(n_pairs=6, seed=42)
    trl_loss, trl_metrics = _trl_dpo(batch, [loss_type], [1.0], beta=beta, label_smoothing=label_smoothing)
    x = _ours(batch)
    out = dpo_loss(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_token_counts=x["nc"],
        rejected_token_counts=x["nr"],
    )
    torch.testing.assert_close(out.losses.mean(), trl_loss, rtol=1e-12, atol=1e-12)
    ours = dpo_metrics(out, x["pc"], x["pr"])
    for name in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]:
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-6), name
    for name in ["logps/chosen", "logps/rejected"]:
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-6), name


def test_rpo_nll_matches_trl_sft_loss() -> None:
    batch = _random_preference_batch(n_pairs=5, seed=7)
    x = _ours(batch)
    trl_sft, _ = _trl_dpo(batch, ["sft"], [1.0], beta=0.1, label_smoothing=0.0)
    torch.testing.assert_close(rpo_nll_loss(x["pc"], x["nc"]), trl_sft, rtol=1e-12, atol=1e-12)
    # RPO = sigmoid DPO + weight * NLL
    trl_rpo, _ = _trl_dpo(batch, ["sigmoid", "sft"], [1.0, 0.5], beta=0.1, label_smoothing=0.0)
    ours = dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1).losses.mean() + 0.5 * rpo_nll_loss(
        x["pc"], x["nc"]
    )
    torch.testing.assert_close(ours, trl_rpo, rtol=1e-12, atol=1e-12)


def test_trl_sigmoid_ignores_label_smoothing() -> None:
    # Documents why dpo_loss refuses label_smoothing with "sigmoid": TRL 1.16 gives the same loss either way.
    batch = _random_preference_batch(n_pairs=4, seed=11)
    plain, _ = _trl_dpo(batch, ["sigmoid"], [1.0], beta=0.1, label_smoothing=0.0)
    smoothed, _ = _trl_dpo(batch, ["sigmoid"], [1.0], beta=0.1, label_smoothing=0.3)
    assert smoothed.item() == plain.item()


@pytest.mark.parametrize(("with_margin", "coef"), [(False, None), (True, None), (False, 0.01), (True, 0.05)])
def test_bradley_terry_matches_trl(with_margin: bool, coef: float | None) -> None:
    reward_trainer = _trl_module("trl.trainer.reward_trainer")
    gen = torch.Generator().manual_seed(5)
    chosen = torch.randn(8, generator=gen, dtype=torch.float64)
    rejected = torch.randn(8, generator=gen, dtype=torch.float64)
    margin = torch.rand(8, generator=gen, dtype=torch.float64) if with_margin else None
    stub_self = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_stub_accelerator(),
        args=SimpleNamespace(center_rewards_coefficient=coef),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )

    def stub_model(**_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    inputs: dict[str, Any] = {"attention_mask": torch.ones(16, 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    trl_loss = reward_trainer.RewardTrainer.compute_loss(stub_self, stub_model, inputs)
    ours = bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=coef)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-12, atol=1e-12)

    trl_metrics = {k: v[0] for k, v in stub_self._metrics["train"].items()}
    metrics = reward_metrics(chosen, rejected)
    renamed = {"reward/mean": "mean_reward", "reward/min": "min_reward", "reward/max": "max_reward"}
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[renamed.get(name, name)], rel=1e-6, abs=1e-6), name
