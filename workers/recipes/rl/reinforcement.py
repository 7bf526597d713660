"""Reinforcement fine-tuning with graders (OpenAI's RFT shape): the policy learns what a grader rewards.

Features
- ``algorithm``: ``grpo`` (default) and ``rloo`` on :class:`~workers.recipes.rl.group.GroupEngine`
  (group-relative or leave-one-out advantages, no value function), or ``ppo``: the PPO engine
  (:class:`~workers.recipes.rl.engine.PPOEngine`, value adapter, GAE) with the grader as its reward.
- One step = ``batch_size`` prompts x ``group_size`` samples; the effective learning rate is
  ``learning_rate x learning_rate_multiplier``; the KL reference is the base with the LoRA adapters
  disabled (no second copy of the weights). ``reasoning_effort`` and ``compute_multiplier`` are
  accepted for compatibility; the job's creation event says they have no effect.
- Rewards from the job's grader (``service.graders``: string_check, text_similarity, python in the
  bubblewrap sandbox, score_model / label_model on a local model, multi): each line of the file is
  the grader's ``item``, each completion its ``sample``. A grader error scores that sample 0, is
  counted in ``grader/errors`` and told in a warning event (first failures named); it never fails the
  step. Grading of a chunk runs while the next chunk samples.
- It runs on the shared loop (``workers.loop``): pause, resume, cancel and crashes behave as for every
  method; a stop that arrives while a step samples abandons that step (its RNG state put back), so
  the checkpoint it leaves is the last finished step's.
- Evaluation on ``validation_file`` every ``eval_interval`` steps (OpenAI's name; ``eval_every_steps``
  otherwise) and at the end: ``eval_samples`` samples per prompt (default 1), ``eval/reward`` and
  ``eval/rewards/<grader>/mean``.
- Alarms (warning events, once each until they clear): every completion of a step truncated at
  ``max_new_tokens``; the reward's standard deviation zero across a whole step (no learning signal);
  the reward rising while KL (with ``kl_coef`` > 0) or the completion length explodes (reward hacking).

Assumptions
- LoRA only in this release (the API refuses ``training_type: full``); one process.
- Lines were validated at upload and every ``{{item.x}}`` the grader reads exists in every line
  (checked at job creation).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import torch

from service.graders import Sandbox, uses_model, uses_python
from service.jobs.spec import LoraTraining, PpoHyperparameters, ReinforcementHyperparameters
from workers.checkpoints import capture_rng, restore_rng
from workers.context import JobContext, JobFailure, TrainResult
from workers.loop import Optimization, StepInterrupted, make_optimizer, plan_steps, run_training
from workers.modeling import disable_dropout, enable_activation_checkpointing, eos_token_ids, load_base
from workers.recipes.common import release, start, stopping
from workers.recipes.rl.engine import NAN_LIMIT, PPOEngine, Prompt
from workers.recipes.rl.grading import GraderReward, GraderScorer, grade_metrics, merge
from workers.recipes.rl.group import GroupEngine
from workers.recipes.rl.models import SharedBase, SharedBaseWeights
from workers.recipes.rl.prompts import load_prompts, prompt_batches
from workers.recipes.rl.sampling import Interrupted

PARAM = "method.reinforcement.hyperparameters"
CHECKPOINT_METRICS = ("loss", "reward", "kl", "learning_rate")
#: a whole step's completions being this much longer than the first step's, while the reward rises
LENGTH_BLOWUP = 2.0
#: KL (nats per token) above which a rising reward is called hacking
KL_BOUND = 0.5


class _Alarms:
    """The series the alarms read and which alarms are up (resumable state)."""

    def __init__(self) -> None:
        self.rewards: list[float] = []
        self.kl: list[float] = []
        self.lengths: list[float] = []
        self.raised = {"truncated": False, "zero_std": False, "hacking": False}

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": list(self.rewards), "kl": list(self.kl), "lengths": list(self.lengths),
                "raised": dict(self.raised)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.rewards, self.kl, self.lengths = list(state["rewards"]), list(state["kl"]), list(state["lengths"])
            self.raised = {k: bool(v) for k, v in state["raised"].items()}


def ppo_hyperparameters(hp: ReinforcementHyperparameters) -> PpoHyperparameters:
    """The PPO engine's settings for ``algorithm: ppo``: a rollout is every sample of the step's prompts."""
    common = {name: getattr(hp, name) for name in ("max_steps", "checkpoint_every_steps", "max_length",
                                                    "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler",
                                                    "weight_decay", "max_grad_norm", "gradient_checkpointing")}
    rollout = int(hp.batch_size) * hp.group_size
    return PpoHyperparameters(**common, n_epochs=int(hp.n_epochs), learning_rate=hp.effective_learning_rate,
                              rollout_batch_size=rollout, mini_batch_size=min(rollout, 8),
                              max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, kl_coef=hp.kl_coef,
                              cliprange=hp.epsilon, ppo_epochs=hp.num_iterations)


class ReinforcementRecipe:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp = ctx.hyperparameters_as(ReinforcementHyperparameters)
        body = ctx.method.reinforcement
        if body is None:
            raise JobFailure("invalid_request", "a reinforcement job needs a grader", "method.reinforcement.grader")
        self.grader = body.grader
        self.alarms = _Alarms()
        self.last_eval: dict[str, float] = {}

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        if not isinstance(ctx.training_type, LoraTraining):
            raise JobFailure("invalid_training_type", "reinforcement fine-tuning trains LoRA adapters (the KL "
                             "reference is the base with the adapters disabled)", "training_type")
        if hp.max_length <= hp.max_new_tokens:
            raise JobFailure("invalid_hyperparameters", f"max_length ({hp.max_length}) must exceed max_new_tokens "
                             f"({hp.max_new_tokens})", f"{PARAM}.max_length")
        begun = start(ctx, hp)
        self.accelerator, self.tokenizer, self.device = begun.accelerator, begun.tokenizer, begun.device
        budget = hp.max_length - hp.max_new_tokens
        self.prompts = load_prompts(ctx, ctx.read_jsonl(ctx.training_file_key), "training_file", self.tokenizer,
                                    budget)
        self.eval_prompts = (load_prompts(ctx, ctx.read_jsonl(ctx.validation_file_key), "validation_file",
                                          self.tokenizer, budget) if ctx.validation_file_key else [])
        base = load_base(begun.base_dir, begun.precision.weights, ctx.store, ctx.parent_adapter_keys)
        base.requires_grad_(False)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(base)
        eos_ids = eos_token_ids(base, self.tokenizer)
        self.is_ppo = hp.algorithm == "ppo"
        self.models = SharedBase(base, ctx.training_type, ctx.seed, with_value=self.is_ppo).to(self.device)
        disable_dropout(self.models)
        self.scorer = self._scorer()
        self.batches_by_epoch = prompt_batches(len(self.prompts), int(hp.batch_size), int(hp.n_epochs), ctx.seed)
        self.total_steps = plan_steps(len(self.batches_by_epoch[0]), hp, batches_per_step=1).total_steps
        params = self.models.trainable
        if self.is_ppo:
            self.ppo_hp = ppo_hyperparameters(hp)
            updates = self.total_steps * PPOEngine.updates_per_step(self.ppo_hp)
            optimizer, scheduler = make_optimizer(params, self.ppo_hp, updates)
            self.optim = Optimization(self.accelerator, optimizer, scheduler, params, hp.max_grad_norm)
            self.reward = GraderReward(self.scorer, self.tokenizer)
            self.ppo = PPOEngine(self.models, self.tokenizer, self.ppo_hp, accelerator=self.accelerator,
                                 optim=self.optim, eos_ids=eos_ids, reward=self.reward, seed=ctx.seed,
                                 on_nan=self._nan_event, should_stop=self._stop_asked)
        else:
            lr = msgspec.structs.replace(hp, learning_rate=hp.effective_learning_rate)
            optimizer, scheduler = make_optimizer(params, lr, self.total_steps * GroupEngine.updates_per_step(hp))
            self.optim = Optimization(self.accelerator, optimizer, scheduler, params, hp.max_grad_norm)
            slow = uses_python(self.grader) or uses_model(self.grader)
            self.group = GroupEngine(self.models, self.tokenizer, hp, accelerator=self.accelerator, optim=self.optim,
                                     eos_ids=eos_ids, scorer=self.scorer, should_stop=self._stop_asked,
                                     chunks=2 if slow and int(hp.batch_size) > 1 else 1)

    def _scorer(self) -> GraderScorer:
        settings = self.ctx.settings.graders
        runner = None
        if uses_model(self.grader):
            from workers.graders.model_graders import runner_for

            runner = runner_for(self.ctx.settings)
        return GraderScorer(self.grader, Sandbox.from_settings(settings), per_sample_timeout=settings.sample_timeout,
                            batch_timeout=5 * settings.sample_timeout, model_runner=runner)

    def _stop_asked(self) -> bool:
        return self.ctx.reporter.stop_reason() is not None

    def _nan_event(self, loss: float, step: int, count: int) -> None:
        self.ctx.reporter.event(f"Non-finite loss ({loss}) at step {step}: that update was skipped "
                                f"({count} of {NAN_LIMIT} allowed)", level="warn",
                                data={"step": step, "nan_losses": count})

    # train ---------------------------------------------------------------------------------------
    def _step(self, group: list[list[int]]) -> tuple[dict[str, float], int]:
        prompts = [self.prompts[i] for i in group[0]]
        state = capture_rng()
        try:
            if self.is_ppo:
                metrics, tokens = self._ppo_step(prompts)
            else:
                r, metrics = self.group.step(prompts)
                self.last_grades = r.grades
                tokens = int(r.attention_mask.sum())
        except Interrupted:
            restore_rng(state)
            raise StepInterrupted() from None
        self._report_grader_errors(metrics)
        self._alarms(len(self.alarms.rewards) + 1, metrics)
        return metrics, tokens

    def _ppo_step(self, prompts: list[Prompt]) -> tuple[dict[str, float], int]:
        step = len(self.alarms.rewards) + 1
        self.reward.last.clear()
        r, metrics = self.ppo.step([p for p in prompts for _ in range(self.hp.group_size)], step)
        grades = merge(self.reward.last)
        metrics |= grade_metrics(grades)
        lengths = r.mask.sum(dim=1).float()
        metrics |= {"reward": float(r.raw_scores.mean()), "reward_std": float(r.raw_scores.std()),
                    "kl": metrics["objective/kl"] / max(float(lengths.mean()), 1.0),
                    "completions/mean_length": float(lengths.mean()),
                    "completions/clipped_ratio": float((~r.has_eos).float().mean())}
        self.last_grades = grades
        return metrics, int(r.attention_mask.sum())

    def _report_grader_errors(self, metrics: dict[str, float]) -> None:
        failed = metrics.get("grader/errors", 0.0)
        if failed:
            summary = self.last_grades.errors or {}
            self.ctx.reporter.event(f"The grader failed on {int(failed)} samples (scored 0): "
                                    f"{summary.get('flags') or ''} {summary.get('details') or ''}".strip(),
                                    level="warn", data={"grader_errors": summary or {"failed": failed}})

    def train(self) -> TrainResult:
        ctx, hp = self.ctx, self.hp
        ctx.reporter.event(f"Fine-tuning started: reinforcement ({hp.algorithm}, grader {self.grader.display_name}"
                           f" [{self.grader.kind}]) on {ctx.model}, {len(self.prompts)} prompts, {self.total_steps} "
                           f"steps of {hp.batch_size} prompts x {hp.group_size} samples",
                           data={"total_steps": self.total_steps, "prompts": len(self.prompts),
                                 "algorithm": hp.algorithm})
        extra: Any = _Both(self.ppo, self.alarms) if self.is_ppo else self.alarms
        try:
            result = run_training(ctx=ctx, hp=self._loop_hp(), model=self.models, optim=self.optim,
                                  weights=SharedBaseWeights(self.models, with_value=self.is_ppo),
                                  result_weights=SharedBaseWeights(self.models, with_value=False),
                                  batches_by_epoch=self.batches_by_epoch, total_steps=self.total_steps,
                                  step_fn=self._step, checkpoint_metrics=CHECKPOINT_METRICS,
                                  evaluate=self.evaluate if self.eval_prompts else None, batches_per_step=1,
                                  extra_state=extra)
        finally:
            self.scorer.close()
        rewards = self.alarms.rewards
        summary = {"steps": result.step, "trained_tokens": result.tokens,
                   "reward": {"first": rewards[0] if rewards else None, "last": rewards[-1] if rewards else None},
                   **self.last_eval}
        return TrainResult(result.status, result.tokens, result.metrics, adapter_key=result.adapter_key,
                           summary=summary, step=result.step)

    def _loop_hp(self) -> ReinforcementHyperparameters:
        """``eval_interval`` (OpenAI's) is the loop's ``eval_every_steps`` when given."""
        if self.hp.eval_interval is None:
            return self.hp
        return msgspec.structs.replace(self.hp, eval_every_steps=int(self.hp.eval_interval))

    def evaluate(self, step: int) -> dict[str, float]:
        samples = int(self.hp.eval_samples or 1)
        parts, lengths = [], []
        size = int(self.hp.batch_size)
        for start_at in range(0, len(self.eval_prompts), size):
            batch = self.eval_prompts[start_at:start_at + size]
            if stopping(self.ctx):
                return {}
            if self.is_ppo:
                r, _ = self.ppo.rollout([p for p in batch for _ in range(samples)])
                parts.append(merge(self.reward.last[-1:]))
                lengths.append(r.mask.sum(dim=1).float())
                self.reward.last.clear()
            else:
                g, _ = self.group.rollout(batch, group_size=samples)
                parts.append(g.grades)
                lengths.append(g.mask.sum(dim=1).float())
        grades = merge(parts)
        result = {"eval/reward": float(grades.rewards.mean()),
                  "eval/completions/mean_length": float(torch.cat(lengths).mean())}
        result |= {k: v for k, v in grade_metrics(grades, "eval/").items() if k.endswith("/mean")}
        self.last_eval = result
        self.ctx.reporter.metrics_only(step, result)
        self.ctx.reporter.event(f"Eval at step {step}: reward={result['eval/reward']:.4f}", type="metrics",
                                data={"step": step, **result})
        return result

    # alarms --------------------------------------------------------------------------------------
    def _alarms(self, step: int, metrics: dict[str, float]) -> None:
        a, reporter = self.alarms, self.ctx.reporter
        a.rewards.append(metrics["reward"])
        a.kl.append(metrics.get("kl", 0.0))
        a.lengths.append(metrics["completions/mean_length"])

        def alarm(name: str, up: bool, message: str) -> None:
            if up and not a.raised[name]:
                reporter.event(message, level="warn", data={"step": step, "alarm": name})
            a.raised[name] = up

        alarm("truncated", metrics["completions/clipped_ratio"] >= 1.0,
              f"Every completion at step {step} was cut at max_new_tokens={self.hp.max_new_tokens}: the grader "
              "never sees a finished answer. Raise max_new_tokens, or ask for shorter answers in the prompt")
        alarm("zero_std", metrics.get("reward_std", 0.0) == 0.0,
              f"Every completion at step {step} got the same reward ({metrics['reward']:.3f}): no group carries "
              "a learning signal. Make the grader finer-grained, raise temperature or group_size, or use "
              "easier/harder prompts")
        rising = len(a.rewards) > 3 and a.rewards[-1] > a.rewards[-4]
        kl_blowup = self.hp.kl_coef > 0 and math.isfinite(a.kl[-1]) and a.kl[-1] > KL_BOUND
        length_blowup = a.lengths[-1] > LENGTH_BLOWUP * max(a.lengths[0], 1.0)
        alarm("hacking", rising and (kl_blowup or length_blowup),
              f"Possible reward hacking at step {step}: the reward rose to {a.rewards[-1]:.3f} while "
              + (f"KL reached {a.kl[-1]:.3f} nats per token" if kl_blowup else
                 f"completions grew to {a.lengths[-1]:.0f} tokens ({a.lengths[-1] / max(a.lengths[0], 1):.1f}x)")
              + ". Check samples against the grader; raise kl_coef or lower the learning rate")

    def cleanup(self) -> None:
        if hasattr(self, "scorer"):
            self.scorer.close()
        release(self, "group", "ppo", "models", "optim", "reward")


class _Both:
    """PPO's engine state and the alarms', resumable together."""

    def __init__(self, engine: PPOEngine, alarms: _Alarms) -> None:
        self.engine, self.alarms = engine, alarms

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "alarms": self.alarms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.engine.load_state_dict(state["engine"])
            self.alarms.load_state_dict(state["alarms"])
