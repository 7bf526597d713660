"""PPO recipe (RLHF): maximise E[r(x, y)] - beta * KL[pi || pi_ref] with PPO's clipped objective.

Features
- Four roles, one copy of the base weights. The base (``model``, with any parent fine-tunes merged
  in) is frozen; the policy is the LoRA adapter ``policy`` on it, the value function the LoRA adapter
  ``value`` on the same base plus a linear value head (hidden -> 1, zero-initialised); the reference
  is the same base with adapters disabled. The reward model (the ``reward_model`` hyperparameter, a
  succeeded reward-model job) is loaded once: when it is a LoRA trained on this very base (same base
  model, same parent fine-tunes), its LoRA weights become a third adapter ``reward`` on the shared
  base and its ``score`` head a small linear layer (peft cannot attach a SEQ_CLS adapter's head to a
  causal LM, so the head lives beside it); otherwise (a full fine-tune, or a different base) it is
  loaded as its own model with ``workers.recipes.reward_model.load_reward_model`` and the job says so.
- One step = one rollout of ``rollout_batch_size`` prompts: KV-cached sampling with the policy adapter
  (``temperature``, ``max_new_tokens``; pure sampling: no top-k/top-p), truncation after the first EOS,
  then no-grad passes for the policy's and the reference's log-probs, the values and the scores;
  per-token rewards (-beta * KL on every response token, plus the score on the last one, minus
  ``missing_eos_penalty`` when no EOS was produced), GAE(gamma, lam), whitened advantages; then
  ``ppo_epochs`` passes over the rollout in shuffled mini-batches of ``mini_batch_size``
  (each split into ``gradient_accumulation_steps`` micro-batches) minimising
  ``policy_loss + vf_coef * value_loss`` with ratio and value clipping. All math is in
  ``workers.ppo_core`` (pure functions with known-answer tests).
- ``kl_estimator`` k1 (``log p - log p_ref``) or k3; ``target_kl`` turns on Ziegler et al.'s adaptive
  KL coefficient (horizon 10 000 episodes), else beta is ``kl_coef`` throughout.
- Metrics with TRL's names (``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
  ``objective/rlhf_reward``, ``objective/scores``: per-sequence sums averaged over the rollout;
  ``policy/approxkl_avg``, ``policy/clipfrac_avg``, ``policy/entropy_avg``, ``loss/policy_avg``,
  ``loss/value_avg``, ``val/clipfrac_avg``, ``val/ratio``: averaged over the mini-batches),
  ``val/explained_variance``, ``val/response_length_mean``, ``val/eos_rate``, ``val/num_eos_tokens``,
  ``kl_coef``, ``episode``, ``loss``, ``objective/scores_raw`` (before ``missing_eos_penalty``),
  ``time/generation``, ``time/scoring`` (reward model plus the
  no-grad policy/reference/value passes), ``time/optimization``.
  ``objective/entropy`` is the exact entropy of the sampling distribution summed over the response
  (TRL logs the sampled estimate ``-log p``, which has the same expectation).
- Alarms (warn events): KL above 10 x ``target_kl`` (10 nats per sequence without a target); the
  score rising while KL explodes (``ppo_core.reward_hacking``); a non-finite loss skips that
  mini-batch's update and is counted, and the third one fails the job with ``nan_loss``.
- Memory: the peak (CUDA ``max_memory_allocated``, or the peak RSS above the RSS before loading on
  the CPU) against the bytes of one copy of the base weights, in the final event's data
  (``memory``), next to the four-copies arithmetic (policy, reference, reward, value). The policy's
  backward runs before the value pass builds its graph, so one set of activations is alive at a time.
- Validation prompts (``validation_file``) are rolled out without training every
  ``eval_every_steps`` and at the end (``eval/objective/scores``, ``eval/objective/kl``, ...).
- Checkpoints and the final archive hold the policy adapter only (loads with ``peft`` like any
  other alignd adapter, and chains into later jobs). The final event's data also carries the first
  and last ``objective/scores`` and ``objective/kl``.
- Shape: ``SharedBase`` (the four roles' weights), ``PPOEngine`` (rollouts and updates, no database:
  ``bench/ppo_memory.py`` runs it too) and ``PPORecipe`` (loading, the reward model's job, the loop,
  alarms, reporting, saving).

Assumptions
- Prompts were validated at upload: ``{"messages": [...]}`` ending with a user turn, or
  ``{"prompt": "..."}``; they are rendered with the chat template plus the assistant header and
  left-truncated to ``max_length - max_new_tokens`` tokens.
- The reward model and the policy share a tokenizer on the adapter path (same base): responses are
  scored as token ids, exactly as the reward model was trained (prompt + completion ending with the
  end-of-turn token). On the separate path, responses are decoded and re-tokenised by ``score``.
- LoRA only (the API refuses ``training_type: full``); a single process (no ``accelerate launch``
  sharding of rollouts); ``batch_size`` is not used (``rollout_batch_size``/``mini_batch_size`` are).
- Pausing saves the policy and stops; a resumed job restarts its value function from scratch.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from service.db.engine import session_scope
from service.db.repositories import JobRunRepository
from service.jobs.spec import LoraTraining, PpoHyperparameters
from workers import data as D
from workers import ppo_core as P
from workers.base_models import load_tokenizer, resolve_base_model
from workers.checkpointing import checkpoint_key, fetch_adapter, final_adapter_key, store_dir_archive
from workers.context import JobContext, JobFailure, TrainResult
from workers.losses import selective_log_softmax
from workers.memory_budget import PeakMeter, parameter_bytes, parameter_count
from workers.modeling import causal_lm_of, load_causal_lm, merge_adapter, pick_dtype
from workers.training import make_accelerator, make_optimizer

POLICY, VALUE, REWARD = "policy", "value", "reward"
REWARD_MODEL_PARAM = "method.ppo.hyperparameters.reward_model"
#: KL bound (nats per sequence) for the alarm when no ``target_kl`` is set.
DEFAULT_KL_BOUND = 10.0
NAN_LIMIT = 3
KL_HORIZON = 10_000
HEAD_KEYS = ("score", "classifier")

# --------------------------------------------------------------------------- prompts

Messages = list[dict[str, Any]]
#: A prompt as messages (for a separately loaded reward model) and as token ids.
Prompt = tuple[Messages, list[int]]



def normalize_prompt(row: dict[str, Any]) -> Messages:
    """A prompts-file line as messages, read exactly like a preference example's prompt."""
    value = row["messages"] if "messages" in row else row["prompt"]
    return D.normalize_preference({"prompt": value, "chosen": ".", "rejected": "."}).prompt


def prompt_ids(messages: Messages, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[int]:
    """Chat template + assistant header (as ``workers.data`` renders a prompt), left-truncated."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer.encode(str(text), add_special_tokens=False))
    return ids[-max_tokens:]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions count real tokens only, so a left-padded prompt sees the positions it would alone."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- the shared base


class SharedBase(nn.Module):
    """One frozen causal LM with LoRA adapters ``policy`` and ``value`` (and maybe ``reward``),
    a value head, and (on the adapter path) the reward model's score head."""

    def __init__(self, base: PreTrainedModel, lora: LoraTraining, seed: int) -> None:
        super().__init__()
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,  # type: ignore[arg-type]
                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")
        names = [n for n, _ in base.named_modules()]
        missing = [m for m in config.target_modules or [] if not any(n.endswith(m) for n in names)]
        if missing:
            raise JobFailure("invalid_training_type", f"training_type.target_modules: {missing} not found in "
                             "the model", "training_type.target_modules")
        torch.manual_seed(seed)
        self.peft: PeftModel = get_peft_model(base, config, adapter_name=POLICY)
        torch.manual_seed(seed + 1)
        self.peft.add_adapter(VALUE, config)
        hidden = int(base.config.hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.reward_head: nn.Linear | None = None
        self.policy_params = [p for n, p in self.peft.named_parameters() if f".{POLICY}." in n]
        self.value_params = [p for n, p in self.peft.named_parameters() if f".{VALUE}." in n]
        self.value_params += list(self.value_head.parameters())
        self._frozen: list[nn.Parameter] = []
        self.use(POLICY)

    @property
    def trainable(self) -> list[nn.Parameter]:
        return self.policy_params + self.value_params

    def use(self, adapter: str) -> None:
        """Make ``adapter`` the active one. peft's ``set_adapter`` also flips ``requires_grad``
        (only the active adapter trainable); policy and value stay trainable, reward frozen."""
        self.peft.set_adapter(adapter)
        self._fix_grads()

    def _fix_grads(self) -> None:
        for p in self.trainable:
            p.requires_grad_(True)
        for p in self._frozen:
            p.requires_grad_(False)

    @contextmanager
    def reference(self) -> Iterator[None]:
        with self.peft.disable_adapter():
            yield
        self._fix_grads()

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lm = causal_lm_of(self.peft)
        decoder = getattr(lm, lm.base_model_prefix)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask))
        return out.last_hidden_state  # type: ignore[no-any-return]

    def lm_head(self) -> nn.Module:
        return causal_lm_of(self.peft).get_output_embeddings()  # type: ignore[no-any-return]

    # the reward model as a third adapter -----------------------------------------------------
    def add_reward_adapter(self, adapter_dir: Path) -> None:
        """A SEQ_CLS LoRA reward model trained on this base: LoRA -> adapter ``reward``, head -> linear."""
        saved = LoraConfig.from_pretrained(str(adapter_dir))
        config = replace(saved, task_type="CAUSAL_LM", modules_to_save=None, inference_mode=True)
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
        head = {k: v for k, v in state.items() if any(f".{name}." in k for name in HEAD_KEYS)}
        lora = {k: v for k, v in state.items() if k not in head}
        weight = next((v for k, v in head.items() if k.endswith(".weight")), None)
        if weight is None or weight.shape[0] != 1:
            raise ValueError(f"{adapter_dir} holds no scalar score head")
        self.peft.add_adapter(REWARD, config)
        result = set_peft_model_state_dict(self.peft, lora, adapter_name=REWARD)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"reward adapter keys the base does not have: {unexpected[:3]}")
        bias = next((v for k, v in head.items() if k.endswith(".bias")), None)
        self.reward_head = nn.Linear(weight.shape[1], 1, bias=bias is not None)
        with torch.no_grad():
            self.reward_head.weight.copy_(weight.float())
            if bias is not None and self.reward_head.bias is not None:
                self.reward_head.bias.copy_(bias.float())
        self.reward_head.requires_grad_(False)
        self._frozen = [p for n, p in self.peft.named_parameters() if f".{REWARD}." in n]
        self._frozen += list(self.reward_head.parameters())
        self.use(POLICY)


def response_logps(models: SharedBase, ids: Tensor, attention: Tensor, response: Tensor, temperature: float,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[b, T]`` of ``response`` (the last ``T`` tokens of ``ids``) under the active adapter
    (or the reference), from ``logits / temperature`` as sampling used them; and their entropy."""
    context = ids.shape[1] - response.shape[1]
    hidden = models.hidden(ids, attention)[:, context - 1:-1]
    logits = models.lm_head()(hidden).float() / temperature
    logps = selective_log_softmax(logits, response)
    entropy = P.entropy_from_logits(logits.detach()) if with_entropy else None
    return logps, entropy


# --------------------------------------------------------------------------- a rollout


@dataclass
class Rollout:
    queries: Tensor        # [B, P] left-padded prompt ids
    query_mask: Tensor     # [B, P]
    responses: Tensor      # [B, T] generated ids, pad after the first EOS
    mask: Tensor           # [B, T] bool: real response tokens (up to and including EOS)
    has_eos: Tensor        # [B] bool
    prompts: list[Messages]
    logps: Tensor = field(init=False)       # [B, T] sampling policy's log-probs
    ref_logps: Tensor = field(init=False)   # [B, T]
    values: Tensor = field(init=False)      # [B, T]
    entropy: Tensor = field(init=False)     # [B, T]
    scores: Tensor = field(init=False)      # [B] reward model (missing-EOS penalty applied)
    raw_scores: Tensor = field(init=False)  # [B] reward model as is

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.queries, self.responses], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.mask.long()], dim=1)

    def __len__(self) -> int:
        return int(self.queries.shape[0])


@dataclass
class RewardModelRef:
    """Where a PPO job's reward model comes from: its job's base chain and its own archive."""

    name: str
    job_id: str
    base_model: str
    parent_adapter_keys: list[str]
    adapter_key: str


def resolve_reward_model(ctx: JobContext, name: str) -> RewardModelRef:
    """The reward-model job behind ``name`` (checked at creation; re-checked here, never trusted)."""
    with session_scope(ctx.reporter.sessions) as session:
        repo = JobRunRepository(session, ctx.job_id)
        org = repo.job().organization_id
        job = repo.parent_by_fine_tuned_model(org, name)
        if job is None or not job.adapter_key or job.status != "succeeded":
            raise JobFailure("reward_model_not_found", f"reward_model '{name}' is not available",
                             REWARD_MODEL_PARAM)
        if (job.method or {}).get("type") != "reward_model":
            raise JobFailure("reward_model_not_a_reward_model", f"'{name}' is not a reward model",
                             REWARD_MODEL_PARAM)
        base, parents = job.model, list[str]()
        while base.startswith("ft:"):
            parent = repo.parent_by_fine_tuned_model(org, base)
            if parent is None or not parent.adapter_key:
                raise JobFailure("reward_model_not_found",
                                 f"the base '{base}' of reward_model '{name}' is not available",
                                 REWARD_MODEL_PARAM)
            parents.insert(0, parent.adapter_key)
            base = parent.model
        return RewardModelRef(name, job.id, base, parents, job.adapter_key)


# --------------------------------------------------------------------------- rollouts and updates


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's (SmolLM2: ``<|im_end|>``, ``<|endoftext|>``)
    and the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None))


class PPOEngine:
    """Rollouts and PPO updates over a :class:`SharedBase`: no database and no object store, so the
    recipe and ``bench/ppo_memory.py`` run exactly the same code."""

    def __init__(self, models: SharedBase, tokenizer: PreTrainedTokenizerBase, hp: PpoHyperparameters, *,
                 accelerator: Accelerator, eos_ids: list[int], total_steps: int, seed: int,
                 separate_reward: tuple[nn.Module, PreTrainedTokenizerBase] | None = None,
                 on_nan: Callable[[float, int, int], None] | None = None) -> None:
        if separate_reward is None and models.reward_head is None:
            raise ValueError("no reward model: add a reward adapter or pass separate_reward")
        self.models, self.tokenizer, self.hp = models, tokenizer, hp
        self.accelerator, self.device = accelerator, accelerator.device
        self.eos_ids = eos_ids
        self.separate_reward = separate_reward
        self.on_nan = on_nan
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=hp.temperature, top_k=0, top_p=1.0, max_new_tokens=hp.max_new_tokens,
            eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        self.kl_ctl: P.FixedKLController | P.AdaptiveKLController = (
            P.AdaptiveKLController(hp.kl_coef, hp.target_kl, KL_HORIZON) if hp.target_kl else
            P.FixedKLController(hp.kl_coef))
        self.mini_batch_size = min(hp.mini_batch_size, hp.rollout_batch_size)
        updates = total_steps * hp.ppo_epochs * math.ceil(hp.rollout_batch_size / self.mini_batch_size)
        self.optimizer, self.scheduler = make_optimizer(models.trainable, hp, updates)
        self.nan_guard = P.NanGuard(NAN_LIMIT)
        self.sampler = torch.Generator().manual_seed(seed)

    # rollout -------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: Sequence[Prompt]) -> tuple[Rollout, dict[str, float]]:
        models, hp = self.models, self.hp
        models.eval()
        queries, query_mask = left_pad([ids for _, ids in batch], self.tokenizer.pad_token_id)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        began = time.perf_counter()
        models.use(POLICY)
        with self.accelerator.autocast():
            out = models.peft.generate(input_ids=queries, attention_mask=query_mask,
                                       generation_config=self.generation_config)
        responses = out[:, queries.shape[1]:]
        if responses.shape[1] == 0:
            raise JobFailure("training_error", "generation produced no tokens")
        mask, has_eos = P.response_mask(responses, self.eos_ids)
        responses = responses.masked_fill(~mask, self.tokenizer.pad_token_id)
        generated = time.perf_counter()
        r = Rollout(queries, query_mask, responses, mask, has_eos, [m for m, _ in batch])
        parts: dict[str, list[Tensor]] = {k: [] for k in ("logps", "entropy", "ref", "values", "scores")}
        for start in range(0, len(r), self.mini_batch_size):
            rows = slice(start, start + self.mini_batch_size)
            ids, attention, response = r.sequences[rows], r.attention_mask[rows], responses[rows]
            logps, entropy = self._policy_logps(ids, attention, response, with_entropy=True)
            parts["logps"].append(logps)
            assert entropy is not None
            parts["entropy"].append(entropy)
            with models.reference():
                parts["ref"].append(self._policy_logps(ids, attention, response)[0])
            parts["values"].append(self._values(ids, attention, response.shape[1]))
            parts["scores"].append(self._scores(ids, attention, r, rows))
        r.logps, r.entropy = torch.cat(parts["logps"]), torch.cat(parts["entropy"])
        r.ref_logps, r.values = torch.cat(parts["ref"]), torch.cat(parts["values"])
        r.raw_scores = torch.cat(parts["scores"]).to(self.device)
        r.scores = P.apply_missing_eos_penalty(r.raw_scores, has_eos, hp.missing_eos_penalty)
        models.use(POLICY)
        return r, {"time/generation": generated - began, "time/scoring": time.perf_counter() - generated}

    def _policy_logps(self, ids: Tensor, attention: Tensor, response: Tensor,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        with self.accelerator.autocast():
            return response_logps(self.models, ids, attention, response, self.hp.temperature, with_entropy)

    def _values(self, ids: Tensor, attention: Tensor, response_length: int) -> Tensor:
        self.models.use(VALUE)
        try:
            with self.accelerator.autocast():
                hidden = self.models.hidden(ids, attention)[:, ids.shape[1] - response_length - 1:-1]
            return self.models.value_head(hidden.float()).squeeze(-1)  # type: ignore[no-any-return]
        finally:
            self.models.use(POLICY)

    def _scores(self, ids: Tensor, attention: Tensor, r: Rollout, rows: slice) -> Tensor:
        """Reward-model scores of prompt + response, read at the response's last real token."""
        lengths = r.mask[rows].sum(dim=1)
        if self.separate_reward is None:
            self.models.use(REWARD)
            try:
                with self.accelerator.autocast():
                    hidden = self.models.hidden(ids, attention)
            finally:
                self.models.use(POLICY)
            last = r.queries.shape[1] + lengths - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
            assert self.models.reward_head is not None
            return self.models.reward_head(pooled).squeeze(-1)  # type: ignore[no-any-return]
        from workers.recipes.reward_model import score

        model, tokenizer = self.separate_reward
        texts = []
        for response, length in zip(r.responses[rows], lengths.tolist(), strict=True):
            texts.append(str(self.tokenizer.decode(response[:length].tolist(), skip_special_tokens=True)))
        pairs: list[tuple[Any, Any]] = list(zip(r.prompts[rows], texts, strict=True))
        return score(model, tokenizer, pairs, batch_size=len(pairs), max_length=self.hp.max_length)

    # advantages ----------------------------------------------------------------------------------
    def advantages(self, r: Rollout) -> dict[str, Tensor]:
        hp = self.hp
        kl = P.kl_estimate(r.logps, r.ref_logps, hp.kl_estimator)
        rewards, non_score = P.per_token_rewards(kl, r.scores, r.mask, self.kl_ctl.value)
        advantages, returns = P.gae(rewards, r.values, r.mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = P.masked_whiten(advantages, r.mask)
        return {"kl": kl, "rewards": rewards, "non_score": non_score, "advantages": advantages,
                "returns": returns}

    # optimisation --------------------------------------------------------------------------------
    def optimize(self, r: Rollout, adv: dict[str, Tensor], step: int) -> dict[str, float]:
        hp, models = self.hp, self.models
        models.train()
        totals: dict[str, float] = {}
        count = 0
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
                    self.optimizer.zero_grad(set_to_none=True)
                    self._nan(stats["loss"], step)
                    continue
                torch.nn.utils.clip_grad_norm_(models.trainable, hp.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        models.eval()
        return {k: v / count for k, v in totals.items()} if count else {}

    def _micro_backward(self, r: Rollout, adv: dict[str, Tensor], rows: Tensor,
                        weight: float) -> tuple[bool, dict[str, float]]:
        """Gradients of ``weight * (policy_loss + vf_coef * value_loss)`` on ``rows``: the policy's graph is
        freed by its backward before the value pass builds its own, so only one is alive at a time.
        Returns (finite, stats); a non-finite loss stops before its backward."""
        hp, models = self.hp, self.models
        ids, attention = r.sequences[rows], r.attention_mask[rows]
        response, mask = r.responses[rows], r.mask[rows]
        models.use(POLICY)
        logps, entropy = self._policy_logps(ids, attention, response, with_entropy=True)
        pg = P.policy_loss(logps, r.logps[rows], adv["advantages"][rows], mask, hp.cliprange)
        pg_loss = float(pg.loss.detach())
        if not math.isfinite(pg_loss):
            return False, {"loss": pg_loss}
        (pg.loss * weight).backward()
        values = self._values(ids, attention, response.shape[1])
        vf = P.value_loss(values, r.values[rows], adv["returns"][rows], mask, hp.cliprange_value)
        vf_loss = float(vf.loss.detach())
        if not math.isfinite(vf_loss):
            return False, {"loss": vf_loss}
        (hp.vf_coef * vf.loss * weight).backward()
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


# --------------------------------------------------------------------------- the recipe


class PPORecipe:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp: PpoHyperparameters = ctx.hyperparameters  # type: ignore[assignment]
        self.last_eval: dict[str, float] = {}

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        if not isinstance(ctx.training_type, LoraTraining):
            raise JobFailure("invalid_training_type", "PPO trains LoRA adapters; training_type 'full' is not "
                             "supported", "training_type")
        if not hp.reward_model:
            raise JobFailure("reward_model_required", "a PPO job needs a reward_model", REWARD_MODEL_PARAM)
        if hp.max_length <= hp.max_new_tokens:
            raise JobFailure("invalid_hyperparameters",
                             f"max_length ({hp.max_length}) must exceed max_new_tokens "
                             f"({hp.max_new_tokens}): prompts get max_length - max_new_tokens tokens",
                             "method.ppo.hyperparameters.max_length")
        torch.manual_seed(ctx.seed)
        random.seed(ctx.seed)
        self.accelerator = make_accelerator(hp)
        self.device = self.accelerator.device
        self.meter = PeakMeter(self.device).start()
        base_dir = resolve_base_model(ctx.base_model, ctx.settings)
        self.tokenizer = load_tokenizer(base_dir)
        self.prompts = self._prompts(ctx.read_jsonl(ctx.training_file_key), "training_file")
        self.eval_prompts = (self._prompts(ctx.read_jsonl(ctx.validation_file_key), "validation_file")
                             if ctx.validation_file_key else [])
        dtype = pick_dtype(self.device)
        base = load_causal_lm(base_dir, dtype)
        for key in ctx.parent_adapter_keys:
            base = merge_adapter(base, ctx.store, key)
        base.requires_grad_(False)
        self.base_bytes = parameter_bytes(base)
        self.base_params = parameter_count(base)
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        self.models = SharedBase(base, ctx.training_type, ctx.seed).to(self.device)
        self._load_reward_model(base_dir, dtype)
        self.kl_bound = 10 * hp.target_kl if hp.target_kl else DEFAULT_KL_BOUND
        per_epoch = math.ceil(len(self.prompts) / hp.rollout_batch_size)
        self.total_steps = min(per_epoch * hp.n_epochs, hp.max_steps or per_epoch * hp.n_epochs)
        self.engine = PPOEngine(self.models, self.tokenizer, hp, accelerator=self.accelerator,
                                eos_ids=eos_token_ids(base, self.tokenizer), total_steps=self.total_steps,
                                seed=ctx.seed, separate_reward=self.separate_reward, on_nan=self._nan_event)

    def _nan_event(self, loss: float, step: int, count: int) -> None:
        self.ctx.reporter.event(f"Non-finite loss ({loss}) at step {step}: that update was skipped "
                                f"({count} of {NAN_LIMIT} allowed)", level="warn",
                                data={"step": step, "nan_losses": count})

    def _prompts(self, rows: list[dict[str, Any]], param: str) -> list[Prompt]:
        budget = self.hp.max_length - self.hp.max_new_tokens
        out, truncated = [], 0
        for row in rows:
            messages = normalize_prompt(row)
            ids = prompt_ids(messages, self.tokenizer, budget + 1)
            truncated += int(len(ids) > budget)
            out.append((messages, ids[-budget:]))
        if not out:
            code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
            raise JobFailure(code, f"{param} holds no prompts", param)
        if truncated:
            self.ctx.reporter.event(f"{truncated} of {len(rows)} prompts in {param} were cut to their last "
                                    f"{budget} tokens (max_length - max_new_tokens)", level="warn",
                                    data={"truncated": truncated, "file": param})
        return out

    def _load_reward_model(self, base_dir: Path, dtype: torch.dtype) -> None:
        ctx = self.ctx
        ref = resolve_reward_model(ctx, self.hp.reward_model or "")
        directory = Path(tempfile.mkdtemp(dir=ctx.workdir))
        adapter_dir = fetch_adapter(ctx.store, ref.adapter_key, directory / "reward")
        same_base = ref.base_model == ctx.base_model and ref.parent_adapter_keys == ctx.parent_adapter_keys
        is_lora = (adapter_dir / "adapter_config.json").exists()
        self.separate_reward: tuple[nn.Module, PreTrainedTokenizerBase] | None = None
        reason = ""
        if same_base and is_lora:
            try:
                self.models.add_reward_adapter(adapter_dir)
                self.models.to(self.device)
                self.reward_mode = "adapter"
                ctx.reporter.event(f"Reward model {ref.name}: loaded as a third LoRA adapter on the shared "
                                   "base (one copy of the base weights for policy, value, reference and "
                                   "reward)",
                                   data={"reward_model": ref.name, "reward_model_mode": "adapter"})
                return
            except (ValueError, KeyError, RuntimeError) as exc:
                if REWARD in self.models.peft.peft_config:
                    self.models.peft.delete_adapter(REWARD)
                self.models.use(POLICY)
                reason = f"its adapter does not fit the shared base ({exc})"
        elif not is_lora:
            reason = "it is a full fine-tune"
        else:
            reason = (f"it was trained on {ref.base_model} with {len(ref.parent_adapter_keys)} parent "
                      "fine-tune(s), a different base from this job's")
        from workers.recipes.reward_model import load_reward_model

        parents = [fetch_adapter(ctx.store, key, directory / f"parent-{i}")
                   for i, key in enumerate(ref.parent_adapter_keys)]
        rm_base = resolve_base_model(ref.base_model, ctx.settings)
        model, tokenizer = load_reward_model(rm_base, adapter_dir, parent_adapter_dirs=parents, dtype=dtype,
                                             device=self.device)
        self.separate_reward = (model, tokenizer)
        self.reward_mode = "separate"
        ctx.reporter.event(f"Reward model {ref.name}: loaded as its own model because {reason} "
                           f"(a second copy of the weights, {parameter_bytes(model) / 2**20:.0f} MiB)",
                           data={"reward_model": ref.name, "reward_model_mode": "separate"})

    # train ---------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[float, list[Prompt]]]:
        """(fractional epoch after this batch, prompts), shuffled afresh every epoch."""
        hp = self.hp
        per_epoch = math.ceil(len(self.prompts) / hp.rollout_batch_size)
        for epoch in range(hp.n_epochs):
            order = list(range(len(self.prompts)))
            random.Random(self.ctx.seed + epoch).shuffle(order)
            for index, start in enumerate(range(0, len(order), hp.rollout_batch_size)):
                chunk = order[start:start + hp.rollout_batch_size]
                yield epoch + (index + 1) / per_epoch, [self.prompts[i] for i in chunk]

    def train(self) -> TrainResult:
        ctx, hp = self.ctx, self.hp
        reporter = ctx.reporter
        reporter.event(f"Fine-tuning started: PPO on {ctx.model} with reward model {hp.reward_model} "
                       f"({self.reward_mode}), {len(self.prompts)} prompts, {self.total_steps} rollouts of "
                       f"{hp.rollout_batch_size}, {hp.ppo_epochs} PPO epochs each",
                       data={"total_steps": self.total_steps, "prompts": len(self.prompts),
                             "reward_model_mode": self.reward_mode})
        reporter.progress(step=0, total_steps=self.total_steps)
        step, tokens, episodes = 0, 0, 0
        last: dict[str, float] = {}
        history: dict[str, list[float]] = {"scores": [], "kl": []}
        alarms = {"kl": False, "hacking": False}
        for epoch, batch in self._batches():
            if step >= self.total_steps:
                break
            reason = reporter.stop_reason()
            if reason in ("pause", "preempt"):  # preempt: the worker is shutting down; the task re-queues
                self.save_checkpoint(step, last)
                return TrainResult("paused" if reason == "pause" else "preempted", tokens, last, step=step)
            if reason is not None:
                reporter.event("Training stopped: the job was cancelled", level="warn")
                return TrainResult("cancelled", tokens, last)
            r, timing = self.engine.rollout(batch)
            adv = self.engine.advantages(r)
            metrics = self.engine.rollout_metrics(r, adv)
            began = time.perf_counter()
            metrics |= self.engine.optimize(r, adv, step + 1)
            metrics["time/optimization"] = time.perf_counter() - began
            metrics |= timing
            self.engine.kl_ctl.update(metrics["objective/kl"], len(r))
            step += 1
            episodes += len(r)
            tokens += int(r.attention_mask.sum())
            metrics["episode"] = float(episodes)
            metrics["epoch"] = epoch
            metrics["learning_rate"] = float(self.engine.scheduler.get_last_lr()[0])
            metrics["num_tokens"] = float(tokens)
            history["scores"].append(metrics["objective/scores"])
            history["kl"].append(metrics["objective/kl"])
            self._alarms(step, metrics, history, alarms)
            reporter.step(step, self.total_steps, metrics, trained_tokens=tokens)
            last = metrics
            if self.eval_prompts and hp.eval_every_steps and step % hp.eval_every_steps == 0:
                self.evaluate(step)
            every = hp.checkpoint_every_steps
            if every and step % every == 0 and step < self.total_steps:
                self.save_checkpoint(step, last)
        if self.eval_prompts and not (hp.eval_every_steps and step % hp.eval_every_steps == 0):
            self.evaluate(step)  # unless the loop just did
        self.save_checkpoint(step, last)
        key = self._save_policy(final_adapter_key(ctx.job_id, attempt=ctx.attempt))
        memory = self.memory_report()
        mib = 2**20
        reporter.event(f"Memory: peak {memory['peak_bytes'] / mib:.0f} MiB ({memory['measured']}) = "
                       f"{memory['peak_over_base']:.2f} x one base copy "
                       f"({memory['base_copy_bytes'] / mib:.0f} MiB); four separate copies would hold "
                       f"{memory['four_copies_bytes'] / mib:.0f} MiB",
                       data={"memory": memory})
        summary = {"steps": step, "trained_tokens": tokens, "episodes": episodes, "memory": memory,
                   "objective/scores": {"first": history["scores"][0] if history["scores"] else None,
                                        "last": history["scores"][-1] if history["scores"] else None},
                   "objective/kl": {"first": history["kl"][0] if history["kl"] else None,
                                    "last": history["kl"][-1] if history["kl"] else None},
                   "nan_losses": self.engine.nan_guard.count, **self.last_eval}
        return TrainResult("succeeded", tokens, last, adapter_key=key, summary=summary, step=step)

    def _alarms(self, step: int, metrics: dict[str, float], history: dict[str, list[float]],
                alarms: dict[str, bool]) -> None:
        reporter, kl = self.ctx.reporter, metrics["objective/kl"]
        above = not math.isfinite(kl) or kl > self.kl_bound
        if above and not alarms["kl"]:
            what = (f"10 x target_kl = {self.kl_bound:g}" if self.hp.target_kl
                    else f"the bound of {self.kl_bound:g}")
            reporter.event(f"KL to the reference is {kl:.3f} nats per response at step {step}, above {what}: "
                           "the policy is drifting far from the reference (raise kl_coef or lower the "
                           "learning rate)",
                           level="warn", data={"step": step, "objective/kl": kl, "kl_bound": self.kl_bound})
        alarms["kl"] = above
        hacking = P.reward_hacking(history["scores"], history["kl"], self.kl_bound)
        if hacking and not alarms["hacking"]:
            reporter.event(f"Possible reward hacking at step {step}: the score rose to "
                           f"{metrics['objective/scores']:.3f} while KL exploded to {kl:.3f}", level="warn",
                           data={"step": step, "objective/scores": metrics["objective/scores"],
                                 "objective/kl": kl})
        alarms["hacking"] = hacking

    def evaluate(self, step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        n = 0
        for start in range(0, len(self.eval_prompts), self.hp.rollout_batch_size):
            batch = self.eval_prompts[start:start + self.hp.rollout_batch_size]
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

    # saving --------------------------------------------------------------------------------------
    def _save_policy(self, key: str) -> str:
        """The policy adapter alone, its files at the archive's top level (``PeftModel.from_pretrained``)."""
        with tempfile.TemporaryDirectory(dir=self.ctx.workdir) as tmp:
            self.models.peft.save_pretrained(tmp, selected_adapters=[POLICY], safe_serialization=True)
            out = Path(tmp) / POLICY if (Path(tmp) / POLICY / "adapter_config.json").exists() else Path(tmp)
            store_dir_archive(self.ctx.store, out, key)
        return key

    def save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        key = self._save_policy(checkpoint_key(self.ctx.job_id, step, attempt=self.ctx.attempt))
        self.ctx.reporter.checkpoint(step, {k: v for k, v in metrics.items() if k in CHECKPOINT_METRICS}, key)

    def memory_report(self) -> dict[str, Any]:
        peak = self.meter.peak()
        return {"device": str(self.device), "measured": self.meter.kind, "peak_bytes": peak,
                "base_copy_bytes": self.base_bytes, "base_parameters": self.base_params,
                "peak_over_base": peak / self.base_bytes if self.base_bytes else math.nan,
                "four_copies_bytes": 4 * self.base_bytes, "reward_model_mode": self.reward_mode}

    def cleanup(self) -> None:
        for name in ("engine", "models", "separate_reward"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


CHECKPOINT_METRICS = ("loss", "objective/scores", "objective/kl", "objective/rlhf_reward", "learning_rate")
