"""Preference generation: a prompts file in, a preference file (a normal file object) out. No training.

The seed's closing advice is that preference data, not the algorithm, limits results; this recipe
makes pairs without annotators, in one of two ways (or both):

- ``judge`` (RLAIF with a trained judge): ``k`` responses per prompt are sampled from ``model`` and
  scored by the judge, a succeeded ``reward_model`` job's ``fine_tuned_model`` (loaded with
  ``workers.reward_scoring.load_reward_model_ref``, scored with its ``score``). The pair is the
  best-scored response (chosen) over the worst-scored one (rejected), both scores kept.
- ``constitution`` (constitutional self-critique, Bai et al. 2022): one response per prompt is
  sampled; a principle is drawn from the list (seeded), the same model is asked to critique its
  response against it, then to revise the response in the light of the critique. The pair is the
  revision (chosen) over the original (rejected); the principle and the critique go in the line's
  ``metadata``. With a ``judge`` as well, both are scored and the pair is kept only when the judge
  prefers the revision (``dropped_judge`` otherwise).

Features
- ``model`` is a base or a fine-tuned model: parents' adapters are merged into the base, as in the
  training recipes. Sampling uses ``temperature`` and ``top_p`` (no top-k), at most
  ``max_new_tokens`` new tokens, stopping at the end-of-turn token; ``batch_size`` prompts go through
  ``generate`` at once (``k`` sequences each), seeded per batch from the job's ``seed``.
- Drops, each counted and reported: ``empty`` (fewer than two non-blank responses, or a blank
  original/revision), ``identical`` (chosen == rejected after stripping whitespace), ``margin``
  (score gap < ``min_margin``), ``judge`` (constitution + judge: the revision does not out-score the
  original).
- Output: TRL conversational preference lines ``{"prompt": [messages], "chosen": [assistant msg],
  "rejected": [assistant msg], "chosen_score", "rejected_score"}`` (scores only when a judge scored),
  returned to the runner, which registers it through ``service.files.create_file`` (validated and
  analysed like an upload, owned by the job's organization, purpose ``fine-tune``, filename
  ``<job id>-preferences.jsonl``); the job lists it in ``result_files`` and has no
  ``fine_tuned_model``. A DPO or reward_model job takes it.
- One "step" per generation batch (progress, ETA, events); metrics (cumulative): ``pairs/kept``,
  ``pairs/dropped_margin``, ``pairs/dropped_identical``, ``pairs/dropped_empty``,
  ``pairs/dropped_judge``, ``pairs/prompts``, ``pairs/generated`` (responses sampled), and with a
  judge ``score/mean_gap``, ``score/chosen_mean``, ``score/rejected_mean`` over the kept pairs.
- No pair kept fails the job with ``no_pairs_kept`` (the counts by reason in the message).

Assumptions
- Prompts were validated at upload (``{"messages": [...]}`` ending with a user turn, or
  ``{"prompt": "..."}``) and are rendered with the chat template plus the assistant header, keeping
  their last ``max_length - max_new_tokens`` tokens (the critique and revision conversations too).
- One process, one device (the API refuses ``resources.gpus`` > 1). Pausing or cancelling stops
  between batches; nothing is checkpointed, so a resumed job generates again from the first prompt.
- ``training_type`` and the optimiser fields of the common hyperparameters are not used.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from service.jobs.spec import GeneratePreferencesHyperparameters
from workers import data as D
from workers.base_models import load_tokenizer, resolve_base_model
from workers.batching import left_pad
from workers.context import JobContext, JobFailure, TrainResult
from workers.modeling import eos_token_ids, load_base
from workers.precision import choose_precision
from workers.recipes.common import release, seed_everything
from workers.reward_scoring import load_reward_model_ref, score

PARAM = "method.generate_preferences.hyperparameters"
JUDGE_PARAM = f"{PARAM}.judge"
DROP_REASONS = ("margin", "identical", "empty", "judge")

CRITIQUE_REQUEST = ("Critique request: identify specific ways in which your last response does not follow "
                    "this principle: {principle}")
REVISION_REQUEST = ("Revision request: rewrite your last response to the original request so that it follows "
                    "this principle: {principle}. Reply with the revised response only.")

Messages = list[dict[str, Any]]


def output_filename(job_id: str) -> str:
    return f"{job_id}-preferences.jsonl"


def preference_line(prompt: Messages, chosen: str, rejected: str, scores: tuple[float, float] | None = None,
                    metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """One TRL conversational preference line (the shape ``service.datasets.validation`` accepts)."""
    line: dict[str, Any] = {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    if scores is not None:
        line["chosen_score"], line["rejected_score"] = float(scores[0]), float(scores[1])
    if metadata:
        line["metadata"] = metadata
    return line


def best_over_worst(texts: Sequence[str], scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the highest and the lowest score (two different indices when ``len(texts) > 1``)."""
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    return order[0], order[-1]


def drop_reason(chosen: str, rejected: str, scores: tuple[float, float] | None, *, revised: bool,
                min_margin: float) -> str | None:
    """Why a candidate pair is dropped, or None to keep it. ``revised``: the pair is (revision,
    original) and a judge's ``scores`` must prefer the revision."""
    if not chosen or not rejected:
        return "empty"
    if chosen == rejected:
        return "identical"
    if scores is not None:
        gap = scores[0] - scores[1]
        if revised and gap <= 0:
            return "judge"
        if gap < min_margin:
            return "margin"
    return None


class GeneratePreferencesRecipe:
    #: nothing is checkpointed: a resumed job generates again from the first prompt (the runner clears
    #: the aborted attempt's metric points first)
    resumes = False

    @staticmethod
    def model_references(hp: Any) -> dict[str, tuple[str | None, str, str]]:
        """Fields naming other jobs' models: field -> (name, param, required method type)."""
        return {"judge": (hp.judge, JUDGE_PARAM, "reward_model")}

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp = ctx.hyperparameters_as(GeneratePreferencesHyperparameters)
        self.judge: tuple[nn.Module, PreTrainedTokenizerBase] | None = None
        self.counts: Counter[str] = Counter()
        self.gaps: list[float] = []
        self.kept_scores: list[tuple[float, float]] = []
        self.tokens = 0

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        if hp.judge is None and not hp.constitution:
            raise JobFailure("judge_or_constitution_required",
                             "a generate_preferences job needs a judge or a constitution", JUDGE_PARAM)
        self.budget = hp.max_length - hp.max_new_tokens
        if self.budget < 1:
            raise JobFailure("invalid_hyperparameters", f"max_length ({hp.max_length}) must exceed "
                             f"max_new_tokens ({hp.max_new_tokens})", f"{PARAM}.max_length")
        seed_everything(ctx.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        base_dir = resolve_base_model(ctx.base_model, ctx.settings)
        self.tokenizer = load_tokenizer(base_dir)
        self.prompts = [D.normalize_prompt(row) for row in ctx.read_jsonl(ctx.training_file_key)]
        if not self.prompts:
            raise JobFailure("invalid_training_file", "training_file holds no prompts", "training_file")
        dtype = choose_precision(ctx.training_type, self.device.type).compute
        model = load_base(base_dir, dtype, ctx.store, ctx.parent_adapter_keys)
        self.model: PreTrainedModel = model.requires_grad_(False).eval().to(self.device)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        if hp.judge:
            self.judge = self._load_judge(hp.judge, dtype)
        self.principles = random.Random(ctx.seed).choices(hp.constitution, k=len(self.prompts)) \
            if hp.constitution else []

    def _load_judge(self, name: str, dtype: torch.dtype) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        """The judge's reward-model job, resolved by the runner (never trusted from the request)."""
        ref = self.ctx.reference("judge")
        judge = load_reward_model_ref(self.ctx, ref, dtype=dtype, device=self.device)
        self.ctx.reporter.event(f"Judge {name} loaded (reward_model job {ref.job_id})",
                                data={"judge": name, "judge_job": ref.job_id})
        return judge

    # generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, conversations: Sequence[Messages], n: int, seed: int) -> list[list[str]]:
        """``n`` sampled responses (stripped text, cut at the end-of-turn token) per conversation."""
        hp = self.hp
        ids = [D.prompt_ids(messages, self.tokenizer, self.budget) for messages in conversations]
        queries, mask = left_pad(ids, self.tokenizer.pad_token_id)
        config = GenerationConfig(do_sample=True, temperature=hp.temperature, top_p=hp.top_p, top_k=0,
                                  max_new_tokens=hp.max_new_tokens, eos_token_id=self.eos_ids,
                                  pad_token_id=self.tokenizer.pad_token_id, num_return_sequences=n,
                                  use_cache=True)
        torch.manual_seed(seed)
        out = self.model.generate(  # type: ignore[operator]
            input_ids=queries.to(self.device), attention_mask=mask.to(self.device), generation_config=config)
        responses = out[:, queries.shape[1]:].tolist()
        texts: list[list[str]] = [[] for _ in conversations]
        for row, tokens in enumerate(responses):
            cut = next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            self.tokens += len(ids[row // n]) + cut
            texts[row // n].append(str(self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)).strip())
        return texts

    def _scores(self, items: Sequence[tuple[Messages, str]]) -> list[float]:
        if not items:
            return []
        assert self.judge is not None
        model, tokenizer = self.judge
        values = score(model, tokenizer, list(items), batch_size=max(1, self.hp.batch_size),
                       max_length=self.hp.max_length)
        return [float(v) for v in values.tolist()]

    # pairing ---------------------------------------------------------------------------------------
    def _record(self, lines: list[dict[str, Any]], prompt: Messages, chosen: str, rejected: str,
                scores: tuple[float, float] | None, metadata: dict[str, Any] | None = None) -> None:
        reason = drop_reason(chosen, rejected, scores, revised=bool(self.hp.constitution),
                             min_margin=self.hp.min_margin)
        if reason is not None:
            self.counts[f"dropped_{reason}"] += 1
            return
        self.counts["kept"] += 1
        if scores is not None:
            self.gaps.append(scores[0] - scores[1])
            self.kept_scores.append(scores)
        lines.append(preference_line(prompt, chosen, rejected, scores, metadata))

    def judge_batch(self, indices: list[int], seed: int) -> list[dict[str, Any]]:
        prompts = [self.prompts[i] for i in indices]
        samples = self.generate(prompts, self.hp.k, seed)
        self.counts["generated"] += sum(len(s) for s in samples)
        candidates = [[text for text in texts if text] for texts in samples]
        flat = [(prompt, text) for prompt, texts in zip(prompts, candidates, strict=True) for text in texts]
        scores = self._scores(flat)
        lines: list[dict[str, Any]] = []
        offset = 0
        for prompt, texts in zip(prompts, candidates, strict=True):
            own = scores[offset:offset + len(texts)]
            offset += len(texts)
            if len(texts) < 2:
                self.counts["dropped_empty"] += 1
                continue
            best, worst = best_over_worst(texts, own)
            self._record(lines, prompt, texts[best], texts[worst], (own[best], own[worst]))
        return lines

    def constitution_batch(self, indices: list[int], seed: int) -> list[dict[str, Any]]:
        prompts = [self.prompts[i] for i in indices]
        principles = [self.principles[i] for i in indices]
        originals = [texts[0] for texts in self.generate(prompts, 1, seed)]
        critique_chats = [[*prompt, {"role": "assistant", "content": original},
                           {"role": "user", "content": CRITIQUE_REQUEST.format(principle=principle)}]
                          for prompt, original, principle in zip(prompts, originals, principles, strict=True)]
        critiques = [texts[0] for texts in self.generate(critique_chats, 1, seed + 1_000_003)]
        revision_chats = [[*chat, {"role": "assistant", "content": critique},
                           {"role": "user", "content": REVISION_REQUEST.format(principle=principle)}]
                          for chat, critique, principle
                          in zip(critique_chats, critiques, principles, strict=True)]
        revisions = [texts[0] for texts in self.generate(revision_chats, 1, seed + 2_000_006)]
        self.counts["generated"] += 3 * len(prompts)
        scores: list[tuple[float, float] | None] = [None] * len(prompts)
        if self.judge is not None:
            scorable = [i for i in range(len(prompts)) if originals[i] and revisions[i]]
            flat = self._scores([(prompts[i], revisions[i]) for i in scorable]
                                + [(prompts[i], originals[i]) for i in scorable])
            for j, i in enumerate(scorable):
                scores[i] = (flat[j], flat[len(scorable) + j])
        lines: list[dict[str, Any]] = []
        for i, prompt in enumerate(prompts):
            metadata = {"principle": principles[i], "critique": critiques[i]}
            self._record(lines, prompt, revisions[i], originals[i], scores[i], metadata)
        return lines

    # train -----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        values = {"pairs/kept": float(self.counts["kept"]), "pairs/prompts": float(self.counts["prompts"]),
                  "pairs/generated": float(self.counts["generated"])}
        values |= {f"pairs/dropped_{r}": float(self.counts[f"dropped_{r}"]) for r in DROP_REASONS}
        if self.kept_scores:
            values["score/mean_gap"] = sum(self.gaps) / len(self.gaps)
            values["score/chosen_mean"] = sum(c for c, _ in self.kept_scores) / len(self.kept_scores)
            values["score/rejected_mean"] = sum(r for _, r in self.kept_scores) / len(self.kept_scores)
        return values

    def train(self) -> TrainResult:
        ctx, hp = self.ctx, self.hp
        modes = [f"judge {hp.judge}"] if hp.judge else []
        if hp.constitution:
            modes.append(f"constitution ({len(hp.constitution)} principles)")
        mode = " + ".join(modes)
        batches = [list(range(i, min(i + hp.batch_size, len(self.prompts))))
                   for i in range(0, len(self.prompts), hp.batch_size)]
        total = len(batches)
        per_prompt = 3 if hp.constitution else hp.k
        ctx.reporter.event(f"Preference generation started: {mode} on {ctx.model}, {len(self.prompts)} "
                           f"prompts, {per_prompt} generations each, {total} batches",
                           data={"total_steps": total, "prompts": len(self.prompts), "k": hp.k})
        path = Path(ctx.workdir) / output_filename(ctx.job_id)
        began = time.perf_counter()
        with path.open("w", encoding="utf-8") as out:
            for step, indices in enumerate(batches, start=1):
                reason = ctx.reporter.stop_reason()
                if reason is not None:
                    return self._stopped(reason, step - 1)
                seed = ctx.seed * 1_000_003 + step
                lines = (self.constitution_batch(indices, seed) if hp.constitution
                         else self.judge_batch(indices, seed))
                for line in lines:
                    out.write(json.dumps(line) + "\n")
                self.counts["prompts"] += len(indices)
                elapsed = time.perf_counter() - began
                ctx.reporter.step(step, total, {**self.metrics(), "tokens_per_second": self.tokens / elapsed},
                                  trained_tokens=self.tokens)
        by_reason = {r: self.counts[f"dropped_{r}"] for r in DROP_REASONS}
        summary: dict[str, Any] = {"prompts": self.counts["prompts"], "generated": self.counts["generated"],
                                   "kept": self.counts["kept"], "dropped": by_reason}
        if self.gaps:
            summary["mean_gap"] = self.metrics()["score/mean_gap"]
        dropped = ", ".join(f"{r} {n}" for r, n in by_reason.items() if n) or "none"
        ctx.reporter.event(f"Generated {summary['generated']} responses for {summary['prompts']} prompts: "
                           f"kept {summary['kept']} pairs, dropped {sum(by_reason.values())} ({dropped})",
                           data=summary)
        if not self.counts["kept"]:
            param = f"{PARAM}.min_margin" if self.counts["dropped_margin"] else None
            raise JobFailure("no_pairs_kept", f"no preference pair was kept out of {summary['prompts']} "
                             f"prompts (dropped: {dropped}); lower min_margin, raise k or temperature, or "
                             "use more prompts", param)
        return TrainResult("succeeded", self.tokens, self.metrics(), step=total, summary=summary,
                           output_path=path, output_filename=output_filename(ctx.job_id))

    def _stopped(self, reason: str, step: int) -> TrainResult:
        status = {"pause": "paused", "preempt": "preempted"}.get(reason, "cancelled")
        if status == "paused":
            self.ctx.reporter.event(f"Generation paused after {step} batches; nothing is checkpointed, a "
                                    "resumed job generates again from the first prompt", level="warn")
        return TrainResult(status, self.tokens, self.metrics(), step=step)

    def cleanup(self) -> None:
        release(self, "model", "judge")


__all__ = ["GeneratePreferencesRecipe", "best_over_worst", "drop_reason", "output_filename", "preference_line"]
