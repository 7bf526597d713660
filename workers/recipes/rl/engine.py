"""Rollouts and updates for online RL over a :class:`~workers.recipes.rl.models.SharedBase`.

No database and no object store: the recipes and ``bench/`` run exactly this code. One step is

1. **sample** (:meth:`PPOEngine.rollout`, :mod:`~workers.recipes.rl.sampling`): KV-cached sampling with the
   policy adapter (``temperature``, ``max_new_tokens``; pure sampling), each response stopped at its
   first end-of-turn token, a stop request polled between tokens;
2. **score** the rollout without gradients: the sampling policy's log-probs (and entropy), the
   reference's (adapters disabled), the values (value adapter) and the rewards (a :class:`Reward`:
   the reward adapter on the shared base, a separately loaded reward model, or — for reinforcement
   fine-tuning — graders, which need no model at all);
3. **advantages** (:class:`GAE` for PPO: per-token rewards ``-beta * KL`` plus the score on the last
   token, GAE(gamma, lam), whitened; another estimator, e.g. group-relative, plugs in the same way);
4. **optimise**: ``ppo_epochs`` passes over the rollout in shuffled mini-batches (each split into
   ``gradient_accumulation_steps`` micro-batches), minimising ``policy_loss + vf_coef * value_loss``
   with ratio and value clipping. Each role's backward runs while its adapter is active, so
   activation checkpointing recomputes the right function. A non-finite loss skips that mini-batch's
   update (the schedule still advances) and is counted; the third fails the job with ``nan_loss``.

All math is in :mod:`workers.recipes.rl.core` (pure functions with known-answer tests). Dropout is
off in every role (``workers.modeling.disable_dropout``, as TRL does), so rollout and update
log-probs come from the same function and the first update's ratio is exactly 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from service.jobs.spec import PpoHyperparameters
from workers.batching import left_pad
from workers.context import JobFailure
from workers.logprobs import target_logps
from workers.loop import Optimization, backward
from workers.recipes.rl import core as P
from workers.recipes.rl.models import POLICY, REWARD, VALUE, SharedBase
from workers.recipes.rl.sampling import Interrupted, sample_groups

Messages = list[dict[str, Any]]
NAN_LIMIT = 3
KL_HORIZON = 10_000


@dataclass(frozen=True)
class Prompt:
    """A prompt as messages (for a separately loaded reward model or a grader), as token ids, and the
    dataset line it came from (what graders read as ``item``)."""

    messages: Messages
    ids: list[int]
    item: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    queries: Tensor        # [B, P] left-padded prompt ids
    query_mask: Tensor     # [B, P]
    responses: Tensor      # [B, T] generated ids, pad after the first EOS
    mask: Tensor           # [B, T] bool: real response tokens (up to and including EOS)
    has_eos: Tensor        # [B] bool
    prompts: list[Prompt]
    logps: Tensor = field(init=False)       # [B, T] sampling policy's log-probs
    ref_logps: Tensor = field(init=False)   # [B, T]
    values: Tensor = field(init=False)      # [B, T]
    entropy: Tensor = field(init=False)     # [B, T]
    scores: Tensor = field(init=False)      # [B] reward (missing-EOS penalty applied)
    raw_scores: Tensor = field(init=False)  # [B] reward as is

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.queries, self.responses], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.mask.long()], dim=1)

    def __len__(self) -> int:
        return int(self.queries.shape[0])


def response_logps(models: SharedBase, ids: Tensor, attention: Tensor, response: Tensor, temperature: float,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[b, T]`` of ``response`` (the last ``T`` tokens of ``ids``) under the active adapter
    (or the reference), from ``logits / temperature`` as sampling used them; and their entropy.
    The LM head runs on the response positions only, a chunk of tokens at a time (``workers.logprobs``)."""
    context = ids.shape[1] - response.shape[1]
    hidden = models.hidden(ids, attention)[:, context - 1:-1]
    out = target_logps(hidden, models.lm_head(), response, temperature=temperature, with_entropy=with_entropy)
    return out.logps, out.entropy


def grouped_response_logps(models: SharedBase, queries: Tensor, query_mask: Tensor, responses: Tensor,
                           response_mask: Tensor, group_size: int, rows: slice, temperature: float,
                           with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`response_logps` of the rows ``rows`` of a grouped rollout (row ``i`` answers prompt
    ``i // group_size``, ``queries`` holding each prompt ``group_size`` times), running each prompt once
    (:meth:`SharedBase.response_hidden`); the whole rows where that path is unavailable."""
    index = torch.arange(queries.shape[0], device=queries.device)[rows] // group_size
    first, last = int(index[0]), int(index[-1])
    one_each = slice(first * group_size, (last + 1) * group_size, group_size)
    hidden = None
    if group_size > 1:
        hidden = models.response_hidden(queries[one_each], query_mask[one_each], responses[rows],
                                        response_mask[rows], index - first)
    if hidden is None:
        ids = torch.cat([queries[rows], responses[rows]], dim=1)
        attention = torch.cat([query_mask[rows], response_mask[rows].long()], dim=1)
        return response_logps(models, ids, attention, responses[rows], temperature, with_entropy)
    out = target_logps(hidden, models.lm_head(), responses[rows], temperature=temperature, with_entropy=with_entropy)
    return out.logps, out.entropy


# --------------------------------------------------------------------------- rewards


class Reward(Protocol):
    """Scores ``[b]`` (fp32, on any device) of the rollout rows ``rows``."""

    def __call__(self, r: Rollout, rows: slice) -> Tensor: ...


@dataclass
class AdapterReward:
    """The reward model as the ``reward`` adapter on the shared base: prompt + response as token ids,
    read at the response's last real token, exactly as the reward model was trained."""

    models: SharedBase
    accelerator: Accelerator

    def __call__(self, r: Rollout, rows: slice) -> Tensor:
        assert self.models.reward_head is not None
        ids, attention = r.sequences[rows], r.attention_mask[rows]
        with self.models.using(REWARD), self.accelerator.autocast():
            hidden = self.models.hidden(ids, attention)
        last = r.queries.shape[1] + r.mask[rows].sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        return self.models.reward_head(pooled).squeeze(-1)  # type: ignore[no-any-return]


@dataclass
class SeparateReward:
    """A reward model with its own weights (a full fine-tune, or another base): responses are decoded
    and re-tokenised with its tokenizer (``workers.reward_scoring.score``)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    policy_tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __call__(self, r: Rollout, rows: slice) -> Tensor:
        from workers.reward_scoring import score

        lengths = r.mask[rows].sum(dim=1).tolist()
        texts = [str(self.policy_tokenizer.decode(response[:n].tolist(), skip_special_tokens=True))
                 for response, n in zip(r.responses[rows], lengths, strict=True)]
        pairs: list[tuple[Any, Any]] = [(p.messages, text) for p, text in zip(r.prompts[rows], texts, strict=True)]
        return score(self.model, self.tokenizer, pairs, batch_size=len(pairs), max_length=self.max_length)


# --------------------------------------------------------------------------- advantages


class AdvantageEstimator(Protocol):
    def __call__(self, r: Rollout, kl_coef: float) -> dict[str, Tensor]: ...


@dataclass
class GAE:
    """PPO's: KL-penalised per-token rewards, GAE(gamma, lam) over the value function, whitened."""

    hp: PpoHyperparameters

    def __call__(self, r: Rollout, kl_coef: float) -> dict[str, Tensor]:
        hp = self.hp
        kl = P.kl_estimate(r.logps, r.ref_logps, hp.kl_estimator)
        rewards, non_score = P.per_token_rewards(kl, r.scores, r.mask, kl_coef)
        advantages, returns = P.gae(rewards, r.values, r.mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = P.masked_whiten(advantages, r.mask)
        return {"kl": kl, "rewards": rewards, "non_score": non_score, "advantages": advantages,
                "returns": returns}


# --------------------------------------------------------------------------- the engine


class PPOEngine:
    """Rollouts and PPO updates over a :class:`SharedBase` with a value adapter."""

    def __init__(self, models: SharedBase, tokenizer: PreTrainedTokenizerBase, hp: PpoHyperparameters, *,
                 accelerator: Accelerator, optim: Optimization, eos_ids: list[int], reward: Reward, seed: int,
                 on_nan: Callable[[float, int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.models, self.tokenizer, self.hp = models, tokenizer, hp
        self.accelerator, self.device, self.optim = accelerator, accelerator.device, optim
        self.eos_ids, self.reward, self.on_nan, self.should_stop = eos_ids, reward, on_nan, should_stop
        self.estimate = GAE(hp)
        self.kl_ctl: P.FixedKLController | P.AdaptiveKLController = (
            P.AdaptiveKLController(hp.kl_coef, hp.target_kl, KL_HORIZON) if hp.target_kl else
            P.FixedKLController(hp.kl_coef))
        self.mini_batch_size = min(hp.mini_batch_size, hp.rollout_batch_size)
        self.nan_guard = P.NanGuard(NAN_LIMIT)
        self.sampler = torch.Generator().manual_seed(seed)

    @staticmethod
    def updates_per_step(hp: PpoHyperparameters) -> int:
        """Optimizer updates one rollout makes (what the schedule is planned in)."""
        mini = min(hp.mini_batch_size, hp.rollout_batch_size)
        return hp.ppo_epochs * math.ceil(hp.rollout_batch_size / mini)

    # state a resumed job needs back (workers.loop.Stateful) -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": float(self.kl_ctl.value), "sampler": self.sampler.get_state(),
                "nan_losses": self.nan_guard.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.value = float(state["kl_coef"])
        self.sampler.set_state(state["sampler"])
        self.nan_guard.count = int(state["nan_losses"])

    # rollout -------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: Sequence[Prompt],
                stop: Callable[[], bool] | None = None) -> tuple[Rollout, dict[str, float]]:
        """Sample one response per prompt (``stop`` polled between tokens: ``Interrupted``), then score it."""
        models = self.models
        models.eval()
        queries, query_mask = left_pad([p.ids for p in batch], self.tokenizer.pad_token_id)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        began = time.perf_counter()
        with models.using(POLICY), self.accelerator.autocast():
            samples = sample_groups(models.peft, queries, query_mask, group_size=1,
                                    max_new_tokens=self.hp.max_new_tokens, temperature=self.hp.temperature, top_p=1.0,
                                    eos_ids=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id, should_stop=stop)
        if samples.stopped:
            raise Interrupted()
        responses, mask, has_eos = samples.responses, samples.mask, samples.has_eos
        generated = time.perf_counter()
        r = Rollout(queries, query_mask, responses, mask, has_eos, list(batch))
        parts: dict[str, list[Tensor]] = {k: [] for k in ("logps", "entropy", "ref", "values", "scores")}
        for start in range(0, len(r), self.mini_batch_size):
            rows = slice(start, start + self.mini_batch_size)
            ids, attention, response = r.sequences[rows], r.attention_mask[rows], responses[rows]
            logps, entropy = self._logps(ids, attention, response, with_entropy=True)
            assert entropy is not None
            parts["logps"].append(logps)
            parts["entropy"].append(entropy)
            with models.reference():
                parts["ref"].append(self._logps(ids, attention, response)[0])
            with models.using(VALUE), self.accelerator.autocast():
                parts["values"].append(models.values(ids, attention, response.shape[1]))
            parts["scores"].append(self.reward(r, rows).to(self.device))
        r.logps, r.entropy = torch.cat(parts["logps"]), torch.cat(parts["entropy"])
        r.ref_logps, r.values = torch.cat(parts["ref"]), torch.cat(parts["values"])
        r.raw_scores = torch.cat(parts["scores"]).float()
        r.scores = P.apply_missing_eos_penalty(r.raw_scores, has_eos, self.hp.missing_eos_penalty)
        return r, {"time/generation": generated - began, "time/scoring": time.perf_counter() - generated}

    def _logps(self, ids: Tensor, attention: Tensor, response: Tensor,
               with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        with self.accelerator.autocast():
            return response_logps(self.models, ids, attention, response, self.hp.temperature, with_entropy)

    def advantages(self, r: Rollout) -> dict[str, Tensor]:
        return self.estimate(r, self.kl_ctl.value)

    # optimisation --------------------------------------------------------------------------------
    def optimize(self, r: Rollout, adv: dict[str, Tensor], step: int) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch updates; metrics are means over the updates made, and
        ``learning_rate`` the mean rate the step's updates used (skipped ones included)."""
        hp, models = self.hp, self.models
        models.train()
        totals: dict[str, float] = {}
        count, rates = 0, []
        micro_size = max(1, math.ceil(self.mini_batch_size / hp.gradient_accumulation_steps))
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(len(r), generator=self.sampler).tolist()
            for start in range(0, len(r), self.mini_batch_size):
                mini = order[start:start + self.mini_batch_size]
                micros = [mini[i:i + micro_size] for i in range(0, len(mini), micro_size)]
                stats: dict[str, float] = {}
                finite = True
                for micro in micros:
                    finite, micro_stats = self._micro_backward(r, adv, torch.tensor(micro, device=self.device),
                                                               len(micro) / len(mini))
                    if not finite:
                        stats["loss"] = micro_stats["loss"]
                        break
                    for k, v in micro_stats.items():
                        stats[k] = stats.get(k, 0.0) + v * len(micro) / len(mini)
                if not finite:
                    rates.append(self.optim.skip())
                    self._nan(stats["loss"], step)
                    continue
                update = self.optim.step()
                rates.append(update["learning_rate"])
                stats["grad_norm"] = update["grad_norm"]
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        models.eval()
        metrics = {k: v / count for k, v in totals.items()} if count else {"loss": math.nan}
        metrics["learning_rate"] = sum(rates) / len(rates)
        return metrics

    def _micro_backward(self, r: Rollout, adv: dict[str, Tensor], rows: Tensor,
                        weight: float) -> tuple[bool, dict[str, float]]:
        """Gradients of ``weight * (policy_loss + vf_coef * value_loss)`` on ``rows``. The policy's graph
        is freed by its backward before the value pass builds its own (one set of activations alive at
        a time), and each backward runs with its own adapter active. Returns (finite, stats); a
        non-finite loss stops before its backward."""
        hp, models = self.hp, self.models
        ids, attention = r.sequences[rows], r.attention_mask[rows]
        response, mask = r.responses[rows], r.mask[rows]
        with models.using(POLICY):
            logps, entropy = self._logps(ids, attention, response, with_entropy=True)
            pg = P.policy_loss(logps, r.logps[rows], adv["advantages"][rows], mask, hp.cliprange)
            pg_loss = float(pg.loss.detach())
            if not math.isfinite(pg_loss):
                return False, {"loss": pg_loss}
            backward(self.accelerator, pg.loss * weight)
        with models.using(VALUE):
            with self.accelerator.autocast():
                values = models.values(ids, attention, response.shape[1])
            vf = P.value_loss(values, r.values[rows], adv["returns"][rows], mask, hp.cliprange_value)
            vf_loss = float(vf.loss.detach())
            if not math.isfinite(vf_loss):
                return False, {"loss": vf_loss}
            backward(self.accelerator, hp.vf_coef * vf.loss * weight)
        assert entropy is not None
        return True, {
            "loss": pg_loss + hp.vf_coef * vf_loss, "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
            "policy/approxkl_avg": float(pg.approxkl), "policy/clipfrac_avg": float(pg.clipfrac),
            "val/clipfrac_avg": float(vf.clipfrac), "val/ratio": float(pg.ratio),
            "policy/entropy_avg": float(P.masked_mean(entropy, mask)),
        }

    def _nan(self, loss: float, step: int) -> None:
        try:
            self.nan_guard.check(loss)
        except FloatingPointError:
            raise JobFailure("nan_loss", f"the loss was not finite {self.nan_guard.count} times "
                             f"(last at step {step}: {loss}); stopping") from None
        if self.on_nan is not None:
            self.on_nan(loss, step, self.nan_guard.count)

    # one step's numbers --------------------------------------------------------------------------
    def rollout_metrics(self, r: Rollout, adv: dict[str, Tensor]) -> dict[str, float]:
        mask = r.mask
        kl_per_seq = P.masked_sum(adv["kl"], mask, dim=1)
        non_score = adv["non_score"].sum(dim=1)
        lengths = mask.sum(dim=1).float()
        return {
            "objective/kl": float(kl_per_seq.mean()),
            "objective/entropy": float(P.masked_sum(r.entropy, mask, dim=1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((non_score + r.scores).mean()),
            "objective/scores": float(r.scores.mean()),
            "objective/scores_raw": float(r.raw_scores.mean()),
            "val/explained_variance": P.explained_variance(r.values, adv["returns"], mask),
            "val/response_length_mean": float(lengths.mean()),
            "val/num_eos_tokens": float(r.has_eos.sum()),
            "val/eos_rate": float(r.has_eos.float().mean()),
            "kl_coef": float(self.kl_ctl.value),
        }

    def step(self, batch: Sequence[Prompt], step: int) -> tuple[Rollout, dict[str, float]]:
        """One PPO step: rollout, advantages, updates, and the KL controller's update after them."""
        step_began = time.perf_counter()
        r, timing = self.rollout(batch, stop=self.should_stop)
        adv = self.advantages(r)
        metrics = self.rollout_metrics(r, adv)
        began = time.perf_counter()
        metrics |= self.optimize(r, adv, step)
        metrics["time/optimization"] = time.perf_counter() - began
        metrics |= timing
        metrics["timing/generation_share"] = timing["time/generation"] / max(time.perf_counter() - step_began, 1e-9)
        self.kl_ctl.update(metrics["objective/kl"], len(r))
        return r, metrics
