"""Critic-free online RL (GRPO, RLOO) over a :class:`~workers.recipes.rl.models.SharedBase` without a
value adapter: sample a group of completions per prompt, grade them, update on group-relative
advantages. No database and no object store: the reinforcement recipe and ``bench/`` run this code.

One step of ``batch_size`` prompts:

1. **sample** ``group_size`` completions per prompt (:mod:`~workers.recipes.rl.sampling`: each prompt's
   KV cache computed once and shared by its group, every row stopped at its end-of-turn token),
   in chunks, each chunk's grading started on a thread while the next chunk samples;
2. **score** without gradients only what the loss needs: the sampling policy's log-probs only when
   ``num_iterations > 1`` (else the ratio's denominator is the update's own detached log-probs, as in
   TRL) or for RLOO's KL penalty, the reference's (adapters disabled, no second copy of the model)
   only when ``kl_coef > 0``; the LM head runs on completion tokens only;
3. **advantages**: GRPO's ``(r - group mean) / (group std + 1e-4)`` (``scale_rewards``), RLOO's
   leave-one-out baseline (KL as a reward penalty, as TRL's RLOO);
4. **update** ``num_iterations`` times (one optimizer step each, gradients accumulated over
   ``gradient_accumulation_steps`` micro-batches), on the clipped surrogate with ``epsilon`` /
   ``epsilon_high``, the ``grpo`` / ``dr_grpo`` / ``dapo`` normalisation and ``kl_coef`` x k3 KL
   (:func:`~workers.recipes.rl.core.group_loss`). With ``mask_truncated_completions`` a completion that
   hit ``max_new_tokens`` contributes nothing.

Metrics use TRL's GRPO names (``reward``, ``reward_std``, ``rewards/<grader>/mean``,
``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio``, ``kl``,
``clip_ratio/region_mean``, ``entropy``) plus ``timing/generation_share`` (sampling's share of the step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from service.jobs.spec import ReinforcementHyperparameters
from workers.batching import left_pad
from workers.loop import Optimization, backward
from workers.recipes.rl import core as P
from workers.recipes.rl.engine import Prompt, grouped_response_logps
from workers.recipes.rl.grading import GraderScorer, Grades, grade_metrics, merge
from workers.recipes.rl.models import POLICY, SharedBase
from workers.recipes.rl.sampling import Interrupted, sample_groups


@dataclass
class GroupRollout:
    prompts: list[Prompt]  # B prompts; row i belongs to prompt i // G
    queries: Tensor        # [B·G, P] left-padded prompt ids, each prompt repeated G times
    query_mask: Tensor
    responses: Tensor      # [B·G, T]
    mask: Tensor           # [B·G, T] bool: real completion tokens
    has_eos: Tensor        # [B·G] bool
    texts: list[str]
    grades: Grades
    loss_mask: Tensor      # ``mask``, without truncated completions when they are masked out
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.queries, self.responses], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.mask.long()], dim=1)

    @property
    def rewards(self) -> Tensor:
        return self.grades.rewards.to(self.responses.device)

    @property
    def group_size(self) -> int:
        return len(self) // max(len(self.prompts), 1)

    def __len__(self) -> int:
        return int(self.responses.shape[0])


class GroupEngine:
    def __init__(self, models: SharedBase, tokenizer: PreTrainedTokenizerBase, hp: ReinforcementHyperparameters, *,
                 accelerator: Accelerator, optim: Optimization, eos_ids: list[int], scorer: GraderScorer,
                 should_stop: Callable[[], bool] | None = None, chunks: int = 1) -> None:
        if hp.algorithm not in ("grpo", "rloo"):
            raise ValueError(f"GroupEngine runs grpo and rloo, not {hp.algorithm}")
        self.models, self.tokenizer, self.hp = models, tokenizer, hp
        self.accelerator, self.device, self.optim = accelerator, accelerator.device, optim
        self.eos_ids, self.scorer, self.should_stop = eos_ids, scorer, should_stop
        self.chunks = max(1, chunks)
        self.epsilon_high = hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon

    @staticmethod
    def updates_per_step(hp: ReinforcementHyperparameters) -> int:
        return hp.num_iterations

    # 1. sample and grade -------------------------------------------------------------------------
    def rollout(self, prompts: Sequence[Prompt], group_size: int | None = None,
                stop: Callable[[], bool] | None = None) -> tuple[GroupRollout, dict[str, float]]:
        hp, models = self.hp, self.models
        group = group_size or hp.group_size
        models.eval()
        began = time.perf_counter()
        size = max(1, math.ceil(len(prompts) / self.chunks))
        pending, parts = [], []
        generation = 0.0
        for start in range(0, len(prompts), size):
            chunk = list(prompts[start:start + size])
            queries, query_mask = left_pad([p.ids for p in chunk], self.tokenizer.pad_token_id)
            queries, query_mask = queries.to(self.device), query_mask.to(self.device)
            t0 = time.perf_counter()
            with models.using(POLICY), self.accelerator.autocast():
                samples = sample_groups(models.peft, queries, query_mask, group_size=group,
                                        max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p,
                                        eos_ids=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                                        should_stop=stop)
            generation += time.perf_counter() - t0
            if samples.stopped:
                raise Interrupted()
            texts = self._decode(samples.responses, samples.mask)
            rows = [p for p in chunk for _ in range(group)]
            pending.append(self.scorer.submit(rows, texts, samples.has_eos.tolist()))
            parts.append((queries.repeat_interleave(group, dim=0), query_mask.repeat_interleave(group, dim=0),
                          samples, texts))
        t0 = time.perf_counter()
        grades = merge([future.result() for future in pending])
        waited = time.perf_counter() - t0
        width = max(q.shape[1] for q, _, _, _ in parts)
        length = max(s.responses.shape[1] for _, _, s, _ in parts)
        pad = self.tokenizer.pad_token_id
        queries = torch.cat([_left(q, width, pad) for q, _, _, _ in parts])
        query_mask = torch.cat([_left(m, width, 0) for _, m, _, _ in parts])
        responses = torch.cat([_right(s.responses, length, pad) for _, _, s, _ in parts])
        mask = torch.cat([_right(s.mask, length, False) for _, _, s, _ in parts])
        has_eos = torch.cat([s.has_eos for _, _, s, _ in parts])
        loss_mask = mask & has_eos[:, None] if hp.mask_truncated_completions else mask
        r = GroupRollout(list(prompts), queries, query_mask, responses, mask, has_eos,
                         [t for _, _, _, texts in parts for t in texts], grades, loss_mask)
        t0 = time.perf_counter()
        self._score(r)
        scoring = time.perf_counter() - t0
        return r, {"time/generation": generation, "time/grading": waited, "time/scoring": scoring,
                   "time/rollout": time.perf_counter() - began}

    def _decode(self, responses: Tensor, mask: Tensor) -> list[str]:
        lengths = mask.sum(dim=1).tolist()
        return [str(self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True))
                for row, n in zip(responses, lengths, strict=True)]

    # 2. what the loss needs, without gradients ---------------------------------------------------
    @torch.no_grad()
    def _score(self, r: GroupRollout) -> None:
        hp = self.hp
        need_old = hp.num_iterations > 1 or (hp.algorithm == "rloo" and hp.kl_coef > 0)
        need_ref = hp.kl_coef > 0
        if not (need_old or need_ref):
            return
        old, ref = [], []
        step = self._micro_size(len(r))
        for start in range(0, len(r), step):
            rows = slice(start, start + step)
            if need_old:
                with self.models.using(POLICY):
                    old.append(self._logps(r, rows)[0])
            if need_ref:
                with self.models.reference():
                    ref.append(self._logps(r, rows)[0])
        r.old_logps = torch.cat(old) if old else None
        r.ref_logps = torch.cat(ref) if ref else None

    def _logps(self, r: GroupRollout, rows: slice = slice(None),
               with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Log-probs of rows ``rows`` of ``r``, each prompt of the slice run once for its whole group."""
        with self.accelerator.autocast():
            return grouped_response_logps(self.models, r.queries, r.query_mask, r.responses, r.mask,
                                          r.group_size, rows, self.hp.temperature, with_entropy)

    def _micro_size(self, rows: int) -> int:
        return max(1, math.ceil(rows / self.hp.gradient_accumulation_steps))

    # 3. advantages -------------------------------------------------------------------------------
    def advantages(self, r: GroupRollout) -> tuple[Tensor, Tensor]:
        """(advantages [B·G], the std each row's group had: zero means the group carried no signal)."""
        hp = self.hp
        rewards = r.rewards
        _, std = P.group_advantages(rewards, hp.group_size, "group")
        if hp.algorithm == "rloo":
            if hp.kl_coef > 0 and r.old_logps is not None and r.ref_logps is not None:
                rewards = rewards - hp.kl_coef * P.sequence_kl(r.old_logps, r.ref_logps, r.mask)
            return P.rloo_advantages(rewards, hp.group_size, normalize=hp.scale_rewards == "batch"), std
        advantages, _ = P.group_advantages(rewards, hp.group_size, str(hp.scale_rewards))
        return advantages, std

    # 4. updates ----------------------------------------------------------------------------------
    def optimize(self, r: GroupRollout, advantages: Tensor) -> dict[str, float]:
        hp, models = self.hp, self.models
        models.train()
        totals: dict[str, float] = {}
        rates: list[float] = []
        tokens = int(r.loss_mask.sum())
        step = self._micro_size(len(r))
        for _ in range(hp.num_iterations):
            stats: dict[str, float] = {}
            finite = True
            for start in range(0, len(r), step):
                rows = slice(start, start + step)
                part = self._micro_backward(r, advantages, rows, tokens)
                if not math.isfinite(part["loss"]):
                    finite = False
                    break
                for k, v in part.items():
                    stats[k] = stats.get(k, 0.0) + v
            if not finite:
                rates.append(self.optim.skip())
                continue
            update = self.optim.step()
            rates.append(update["learning_rate"])
            stats["grad_norm"] = update["grad_norm"]
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / hp.num_iterations
        models.eval()
        if not totals:
            totals = {"loss": math.nan}
        totals["learning_rate"] = sum(rates) / len(rates)
        return totals

    def _micro_backward(self, r: GroupRollout, advantages: Tensor, rows: slice, tokens: int) -> dict[str, float]:
        hp = self.hp
        mask = r.loss_mask[rows]
        share = int(mask.sum()) / max(tokens, 1)  # token-weighted share for the means below
        with self.models.using(POLICY):
            logps, entropy = self._logps(r, rows, with_entropy=True)
            old = r.old_logps[rows] if r.old_logps is not None else logps.detach()
            if hp.algorithm == "rloo":
                out = P.rloo_loss(logps, old, advantages[rows], mask, epsilon=hp.epsilon,
                                  epsilon_high=self.epsilon_high, total_sequences=len(r))
            else:
                ref = r.ref_logps[rows] if r.ref_logps is not None else None
                out = P.group_loss(logps, old, advantages[rows], mask, epsilon=hp.epsilon,
                                   epsilon_high=self.epsilon_high, loss_type=hp.loss_type,
                                   total_sequences=len(r), total_tokens=tokens,
                                   max_completion_length=hp.max_new_tokens, beta=hp.kl_coef, ref_logps=ref,
                                   kl_bias_correction=hp.kl_bias_correction)
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                return {"loss": loss}
            backward(self.accelerator, out.loss)
        assert entropy is not None
        low, high = float(out.clip_low), float(out.clip_high)
        return {"loss": loss, "kl": float(out.kl) * share, "entropy": float(P.masked_mean(entropy, mask)) * share,
                "clip_ratio/low_mean": low * share, "clip_ratio/high_mean": high * share,
                "clip_ratio/region_mean": (low + high) * share}

    # one step ------------------------------------------------------------------------------------
    def rollout_metrics(self, r: GroupRollout, std: Tensor, prefix: str = "") -> dict[str, float]:
        rewards = r.rewards.float()
        lengths = r.mask.sum(dim=1).float()
        terminated = lengths[r.has_eos]
        out = {f"{prefix}reward": float(rewards.mean()),
               f"{prefix}reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
               f"{prefix}frac_reward_zero_std": float((std == 0).float().mean()),
               f"{prefix}completions/mean_length": float(lengths.mean()),
               f"{prefix}completions/min_length": float(lengths.min()),
               f"{prefix}completions/max_length": float(lengths.max()),
               f"{prefix}completions/clipped_ratio": float((~r.has_eos).float().mean()),
               f"{prefix}completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0}
        out |= grade_metrics(r.grades, prefix)
        return out

    def step(self, prompts: Sequence[Prompt]) -> tuple[GroupRollout, dict[str, float]]:
        began = time.perf_counter()
        r, timing = self.rollout(prompts, stop=self.should_stop)
        advantages, std = self.advantages(r)
        metrics = self.rollout_metrics(r, std)
        t0 = time.perf_counter()
        metrics |= self.optimize(r, advantages)
        metrics["time/optimization"] = time.perf_counter() - t0
        metrics |= timing
        metrics["timing/generation_share"] = timing["time/generation"] / max(time.perf_counter() - began, 1e-9)
        return r, metrics


def _left(t: Tensor, width: int, value: Any) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device), t], dim=1)


def _right(t: Tensor, width: int, value: Any) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)], dim=1)
