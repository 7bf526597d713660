"""PPO recipe (RLHF): maximise E[r(x, y)] - beta * KL[pi || pi_ref] with PPO's clipped objective.

Features
- Four roles, one copy of the base weights (:mod:`workers.recipes.rl.models`): policy and value are
  LoRA adapters on the frozen base, the reference is the base with adapters disabled, and the reward
  model (the ``reward_model`` hyperparameter: a succeeded reward-model job, resolved by the runner)
  is a third adapter when it is a LoRA trained on this very base (same base model, same parent
  fine-tunes); otherwise it is loaded as its own model (``workers.reward_scoring``) and the job says so.
- One step = one rollout of ``rollout_batch_size`` prompts and its PPO updates
  (:class:`~workers.recipes.rl.engine.PPOEngine`); ``kl_estimator`` k1 or k3; ``target_kl`` turns on
  Ziegler et al.'s adaptive KL coefficient (horizon 10 000 episodes), else beta is ``kl_coef``.
- It runs on the shared loop (``workers.loop``), so stop, pause, cancel, checkpoints and resume mean
  what they mean for every method. A checkpoint holds the policy and value adapters, the value head,
  optimizer, scheduler, RNG states, the KL controller, the minibatch sampler, the NaN count, the
  alarm history, the step and the token count: a resumed job continues at step k+1 with the policy
  and value it had. The result archive (and ``fine_tuned_model``) is the policy adapter alone.
- Dropout is off in every role, as in TRL (the adapter config keeps the user's ``dropout``).
- Metrics with TRL's names (``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
  ``objective/rlhf_reward``, ``objective/scores``: per-sequence sums averaged over the rollout;
  ``policy/approxkl_avg``, ``policy/clipfrac_avg``, ``policy/entropy_avg``, ``loss/policy_avg``,
  ``loss/value_avg``, ``val/clipfrac_avg``, ``val/ratio``: averaged over the mini-batch updates),
  ``val/explained_variance``, ``val/response_length_mean``, ``val/eos_rate``, ``val/num_eos_tokens``,
  ``kl_coef``, ``episode``, ``loss``, ``grad_norm``, ``learning_rate`` (the mean rate the step's
  updates used), ``objective/scores_raw`` (before ``missing_eos_penalty``), ``time/generation``,
  ``time/scoring``, ``time/optimization``, ``timing/generation_share`` (sampling's share of the step's
  time, the number the GPU targets hold to ≤ 0.5). ``objective/entropy`` is the exact entropy of the sampling
  distribution summed over the response (TRL logs the sampled estimate ``-log p``).
- Alarms (warn events): KL above 10 x ``target_kl`` (10 nats per sequence without a target); the
  score rising while KL explodes (``core.reward_hacking``); skipped non-finite updates.
- Memory: the peak (CUDA ``max_memory_allocated``, or the peak RSS above the RSS before loading on
  the CPU) against the bytes of one copy of the base weights, in the final event's data (``memory``),
  next to the four-copies arithmetic (policy, reference, reward, value).
- Validation prompts (``validation_file``) are rolled out without training every
  ``eval_every_steps`` and at the end (``eval/objective/scores``, ``eval/objective/kl``, ...).

Assumptions
- Prompts were validated at upload: ``{"messages": [...]}`` ending with a user turn, or
  ``{"prompt": "..."}``; they are rendered with the chat template plus the assistant header and
  left-truncated to ``max_length - max_new_tokens`` tokens (``workers.data.prompt_ids``).
- On the adapter path the reward model and the policy share a tokenizer: responses are scored as
  token ids, exactly as the reward model was trained. On the separate path they are decoded and
  re-tokenised.
- LoRA only (the API refuses ``training_type: full``); one process; ``batch_size`` is not used
  (``rollout_batch_size``/``mini_batch_size`` are).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from service.jobs.spec import LoraTraining, PpoHyperparameters
from workers.archives import fetch_adapter
from workers.checkpoints import capture_rng, restore_rng
from workers.context import JobContext, JobFailure, TrainResult
from workers.loop import Optimization, StepInterrupted, make_optimizer, plan_steps, run_training
from workers.memory import PeakMeter, parameter_bytes, parameter_count
from workers.modeling import disable_dropout, enable_activation_checkpointing, eos_token_ids, load_base
from workers.recipes.common import release, start, stopping
from workers.recipes.rl import core as P
from workers.recipes.rl.engine import NAN_LIMIT, AdapterReward, PPOEngine, Reward, SeparateReward
from workers.recipes.rl.models import SharedBase, SharedBaseWeights
from workers.recipes.rl.prompts import load_prompts, prompt_batches
from workers.recipes.rl.sampling import Interrupted
from workers.reward_scoring import load_reward_model_ref

REWARD_MODEL_PARAM = "method.ppo.hyperparameters.reward_model"
#: KL bound (nats per sequence) for the alarm when no ``target_kl`` is set.
DEFAULT_KL_BOUND = 10.0
CHECKPOINT_METRICS = ("loss", "objective/scores", "objective/kl", "objective/rlhf_reward", "learning_rate")


class _History:
    """The per-step series the alarms read, and which alarms are raised (resumable state)."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.kl: list[float] = []
        self.episodes = 0
        self.raised = {"kl": False, "hacking": False}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "kl": list(self.kl), "episodes": self.episodes,
                "raised": dict(self.raised)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores, self.kl = list(state["scores"]), list(state["kl"])
        self.episodes = int(state["episodes"])
        self.raised = {k: bool(v) for k, v in state["raised"].items()}


class _EngineState:
    """``workers.loop.Stateful`` for PPO: the engine's and the alarms' state together."""

    def __init__(self, engine: PPOEngine, history: _History) -> None:
        self.engine, self.history = engine, history

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.engine.load_state_dict(state["engine"])
            self.history.load_state_dict(state["history"])


class PPORecipe:
    @staticmethod
    def model_references(hp: Any) -> dict[str, tuple[str | None, str, str]]:
        """Fields naming other jobs' models: field -> (name, param, required method type)."""
        return {"reward_model": (hp.reward_model, REWARD_MODEL_PARAM, "reward_model")}

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp = ctx.hyperparameters_as(PpoHyperparameters)
        self.last_eval: dict[str, float] = {}
        self.history = _History()

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        if not isinstance(ctx.training_type, LoraTraining):
            raise JobFailure("invalid_training_type", "PPO trains LoRA adapters; training_type 'full' is not "
                             "supported", "training_type")
        if hp.max_length <= hp.max_new_tokens:
            raise JobFailure("invalid_hyperparameters",
                             f"max_length ({hp.max_length}) must exceed max_new_tokens "
                             f"({hp.max_new_tokens}): prompts get max_length - max_new_tokens tokens",
                             "method.ppo.hyperparameters.max_length")
        if not hp.reward_model:
            raise JobFailure("reward_model_required", "a PPO job needs a reward_model", REWARD_MODEL_PARAM)
        reward_ref = ctx.reference("reward_model")
        begun = start(ctx, hp)
        self.accelerator, self.tokenizer, self.device = begun.accelerator, begun.tokenizer, begun.device
        self.meter = PeakMeter(self.device).start()
        budget = hp.max_length - hp.max_new_tokens
        self.prompts = load_prompts(ctx, ctx.read_jsonl(ctx.training_file_key), "training_file", self.tokenizer,
                                    budget)
        self.eval_prompts = (load_prompts(ctx, ctx.read_jsonl(ctx.validation_file_key), "validation_file",
                                          self.tokenizer, budget) if ctx.validation_file_key else [])
        dtype = begun.precision.weights
        base = load_base(begun.base_dir, dtype, ctx.store, ctx.parent_adapter_keys)
        base.requires_grad_(False)
        self.base_bytes, self.base_params = parameter_bytes(base), parameter_count(base)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(base)
        eos_ids = eos_token_ids(base, self.tokenizer)
        self.models = SharedBase(base, ctx.training_type, ctx.seed).to(self.device)
        reward = self._load_reward_model(reward_ref, dtype)
        disable_dropout(self.models)
        if ctx.training_type.dropout > 0:
            ctx.reporter.event(f"LoRA dropout {ctx.training_type.dropout} is saved in the adapter's config but off "
                               "while PPO trains: rollouts and updates must see the same policy (as in TRL)",
                               data={"lora_dropout": ctx.training_type.dropout})
        self.kl_bound = 10 * hp.target_kl if hp.target_kl else DEFAULT_KL_BOUND
        self.batches_by_epoch = prompt_batches(len(self.prompts), hp.rollout_batch_size, hp.n_epochs, ctx.seed)
        self.total_steps = plan_steps(len(self.batches_by_epoch[0]), hp, batches_per_step=1).total_steps
        params = self.models.trainable
        optimizer, scheduler = make_optimizer(params, hp, self.total_steps * PPOEngine.updates_per_step(hp))
        self.optim = Optimization(self.accelerator, optimizer, scheduler, params, hp.max_grad_norm)
        self.engine = PPOEngine(self.models, self.tokenizer, hp, accelerator=self.accelerator, optim=self.optim,
                                eos_ids=eos_ids, reward=reward, seed=ctx.seed, on_nan=self._nan_event,
                                should_stop=lambda: ctx.reporter.stop_reason() is not None)

    def _nan_event(self, loss: float, step: int, count: int) -> None:
        self.ctx.reporter.event(f"Non-finite loss ({loss}) at step {step}: that update was skipped "
                                f"({count} of {NAN_LIMIT} allowed)", level="warn",
                                data={"step": step, "nan_losses": count})

    def _load_reward_model(self, ref: Any, dtype: torch.dtype) -> Reward:
        ctx = self.ctx
        same_base = ref.base_model == ctx.base_model and ref.parent_adapter_keys == ctx.parent_adapter_keys
        adapter_dir = fetch_adapter(ctx.store, ref.adapter_key, Path(tempfile.mkdtemp(dir=ctx.workdir)) / "reward")
        is_lora = (adapter_dir / "adapter_config.json").exists()
        if same_base and is_lora:
            try:
                self.models.add_reward_adapter(adapter_dir)
                self.models.to(self.device)
                self.reward_mode = "adapter"
                ctx.reporter.event(f"Reward model {ref.name}: loaded as a third LoRA adapter on the shared base "
                                   "(one copy of the base weights for policy, value, reference and reward)",
                                   data={"reward_model": ref.name, "reward_model_mode": "adapter"})
                return AdapterReward(self.models, self.accelerator)
            except (ValueError, KeyError, RuntimeError) as exc:
                self.models.drop_reward_adapter()
                reason = f"its adapter does not fit the shared base ({exc})"
        elif not is_lora:
            reason = "it is a full fine-tune"
        else:
            reason = (f"it was trained on {ref.base_model} with {len(ref.parent_adapter_keys)} parent "
                      "fine-tune(s), a different base from this job's")
        model, tokenizer = load_reward_model_ref(ctx, ref, dtype=dtype, device=self.device)
        self.separate_reward = model
        self.reward_mode = "separate"
        ctx.reporter.event(f"Reward model {ref.name}: loaded as its own model because {reason} "
                           f"(a second copy of the weights, {parameter_bytes(model) / 2**20:.0f} MiB)",
                           data={"reward_model": ref.name, "reward_model_mode": "separate"})
        return SeparateReward(model, tokenizer, self.tokenizer, self.hp.max_length)

    # train ---------------------------------------------------------------------------------------
    def _step(self, group: list[list[int]]) -> tuple[dict[str, float], int]:
        step = len(self.history.scores) + 1
        state = capture_rng()
        try:
            r, metrics = self.engine.step([self.prompts[i] for i in group[0]], step)
        except Interrupted:
            restore_rng(state)
            raise StepInterrupted() from None
        self.history.episodes += len(r)
        metrics["episode"] = float(self.history.episodes)
        self.history.scores.append(metrics["objective/scores"])
        self.history.kl.append(metrics["objective/kl"])
        self._alarms(step, metrics)
        return metrics, int(r.attention_mask.sum())

    def train(self) -> TrainResult:
        ctx, hp = self.ctx, self.hp
        ctx.reporter.event(f"Fine-tuning started: PPO on {ctx.model} with reward model {hp.reward_model} "
                           f"({self.reward_mode}), {len(self.prompts)} prompts, {self.total_steps} rollouts of "
                           f"{hp.rollout_batch_size}, {hp.ppo_epochs} PPO epochs each",
                           data={"total_steps": self.total_steps, "prompts": len(self.prompts),
                                 "reward_model_mode": self.reward_mode})
        result = run_training(ctx=ctx, hp=hp, model=self.models, optim=self.optim,
                              weights=SharedBaseWeights(self.models),
                              result_weights=SharedBaseWeights(self.models, with_value=False),
                              batches_by_epoch=self.batches_by_epoch, total_steps=self.total_steps,
                              step_fn=self._step, checkpoint_metrics=CHECKPOINT_METRICS,
                              evaluate=self.evaluate if self.eval_prompts else None, batches_per_step=1,
                              extra_state=_EngineState(self.engine, self.history))
        if result.status != "succeeded":
            return TrainResult(result.status, result.tokens, result.metrics, step=result.step)
        memory = self.memory_report()
        mib = 2**20
        ctx.reporter.event(f"Memory: peak {memory['peak_bytes'] / mib:.0f} MiB ({memory['measured']}) = "
                           f"{memory['peak_over_base']:.2f} x one base copy "
                           f"({memory['base_copy_bytes'] / mib:.0f} MiB); four separate copies would hold "
                           f"{memory['four_copies_bytes'] / mib:.0f} MiB", data={"memory": memory})
        scores, kls = self.history.scores, self.history.kl
        summary = {"steps": result.step, "trained_tokens": result.tokens,
                   "episodes": self.history.episodes, "memory": memory,
                   "objective/scores": {"first": scores[0] if scores else None, "last": scores[-1] if scores else None},
                   "objective/kl": {"first": kls[0] if kls else None, "last": kls[-1] if kls else None},
                   "nan_losses": self.engine.nan_guard.count, **self.last_eval}
        return TrainResult("succeeded", result.tokens, result.metrics, adapter_key=result.adapter_key,
                           summary=summary, step=result.step)

    def _alarms(self, step: int, metrics: dict[str, float]) -> None:
        reporter, kl, raised = self.ctx.reporter, metrics["objective/kl"], self.history.raised
        above = not math.isfinite(kl) or kl > self.kl_bound
        if above and not raised["kl"]:
            what = f"10 x target_kl = {self.kl_bound:g}" if self.hp.target_kl else f"the bound of {self.kl_bound:g}"
            reporter.event(f"KL to the reference is {kl:.3f} nats per response at step {step}, above {what}: "
                           "the policy is drifting far from the reference (raise kl_coef or lower the "
                           "learning rate)",
                           level="warn", data={"step": step, "objective/kl": kl, "kl_bound": self.kl_bound})
        raised["kl"] = above
        hacking = P.reward_hacking(self.history.scores, self.history.kl, self.kl_bound)
        if hacking and not raised["hacking"]:
            reporter.event(f"Possible reward hacking at step {step}: the score rose to "
                           f"{metrics['objective/scores']:.3f} while KL exploded to {kl:.3f}", level="warn",
                           data={"step": step, "objective/scores": metrics["objective/scores"],
                                 "objective/kl": kl})
        raised["hacking"] = hacking

    def evaluate(self, step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        n = 0
        for start_at in range(0, len(self.eval_prompts), self.hp.rollout_batch_size):
            batch = self.eval_prompts[start_at:start_at + self.hp.rollout_batch_size]
            if stopping(self.ctx):
                return {}
            r, _ = self.engine.rollout(batch)
            metrics = self.engine.rollout_metrics(r, self.engine.advantages(r))
            for k in ("objective/scores", "objective/kl", "objective/rlhf_reward", "val/response_length_mean",
                      "val/eos_rate"):
                totals[k] = totals.get(k, 0.0) + metrics[k] * len(r)
            n += len(r)
        result = {f"eval/{k}": v / n for k, v in totals.items()}
        self.last_eval = result
        self.ctx.reporter.metrics_only(step, result)
        self.ctx.reporter.event(f"Eval at step {step}: score={result['eval/objective/scores']:.4f}, "
                                f"kl={result['eval/objective/kl']:.4f}", data={"step": step, **result})
        return result

    def memory_report(self) -> dict[str, Any]:
        peak = self.meter.peak()
        return {"device": str(self.device), "measured": self.meter.kind, "peak_bytes": peak,
                "base_copy_bytes": self.base_bytes, "base_parameters": self.base_params,
                "peak_over_base": peak / self.base_bytes if self.base_bytes else math.nan,
                "four_copies_bytes": 4 * self.base_bytes, "reward_model_mode": self.reward_mode}

    def cleanup(self) -> None:
        release(self, "engine", "models", "optim", "separate_reward")
