"""Reward-model recipe: a scalar-head sequence classifier trained on preference pairs (Bradley-Terry).

Features
- The base loads as ``AutoModelForSequenceClassification(num_labels=1)``: the decoder's weights and
  a new ``score`` head (hidden -> 1). Chained bases (``model`` = a fine-tuned model) have their
  parents merged into a causal LM whose decoder is copied into the classifier.
- LoRA with ``task_type="SEQ_CLS"``: peft adds the ``score`` head to ``modules_to_save``, so the head
  is trained in full and saved in the adapter; ``training_type: full`` trains everything.
- A pair's reward = the head applied to the last hidden state of the last *attended* token of
  prompt + completion (the completion's end-of-turn token). The position comes from the attention
  mask, not from ``pad_token_id``: SmolLM2 pads with ``<|im_end|>``, which is also the token every
  sequence ends with, so transformers' own pooling would pick the token before it.
- Chosen and rejected run in one forward pass (``collate_pairs``' ``[chosen..., rejected...]``).
- ``packing`` (default on): those sequences are packed into rows of ``max_length`` tokens
  (``workers.packing``), each with its own positions and a document mask, so every score equals the
  padded batch's; the layout and the padding share before and after are reported at the start.
- Loss = ``workers.losses.bradley_terry_loss`` with the data's per-pair ``margin`` (0 where a pair
  has none) and ``center_rewards_coefficient``; TRL's metrics ``loss``, ``accuracy``, ``margin``,
  ``reward/mean``, ``reward/min``, ``reward/max``, plus ``grad_norm`` and ``learning_rate``;
  ``eval/*`` of the same on the validation file every ``eval_every_steps`` and at the end.
- The final archive is the adapter (with the head) or the full classifier with its tokenizer; it is
  what a PPO job or a judge loads and scores through ``workers.reward_scoring``, whose
  ``SequenceScores`` is also the forward trained here.
- Several ranks: DDP, or FSDP2 for a full fine-tune whose strategy is ``fsdp`` (``workers.fsdp``).

Assumptions
- Pairs are validated at upload and tokenised through ``workers.data`` exactly as for DPO (prompt
  with the assistant header, completion = final assistant turn with its end-of-turn token once).
- Sequences are right-padded (the collators in ``workers.batching`` do so).
- ``trained_tokens`` counts every token processed, chosen and rejected, prompt and completion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from service.jobs.spec import LoraTraining, RewardModelHyperparameters
from workers import batching as B
from workers import data as D
from workers import packing as P
from workers.attention import choose_layout, use_flex
from workers.context import JobContext, JobFailure, TrainResult
from workers.loop import accumulate, example_weights, gradient_step, plan_steps, run_training
from workers.losses import bradley_terry_loss, reward_metrics
from workers.modeling import apply_training_type, enable_activation_checkpointing, load_classifier_base
from workers.recipes.common import prepare_training, release, report_layout, result_weights, start, stopping
from workers.reward_scoring import SequenceScores
from workers.signals import OverOptimization

CHECKPOINT_METRICS = ("loss", "accuracy", "margin", "learning_rate")


def pair_loss(scores: Tensor, batch: dict[str, Tensor],
              center_rewards_coefficient: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry loss and TRL's metrics for ``scores`` in ``collate_pairs`` order
    ``[chosen..., rejected...]``.

    ``batch["margin"]`` (present when any pair in it has one) is each pair's required reward gap.
    """
    half = scores.shape[0] // 2
    chosen, rejected = scores[:half], scores[half:]
    margin = batch.get("margin")
    if margin is not None:
        margin = margin.to(device=scores.device, dtype=scores.dtype)
    loss = bradley_terry_loss(chosen, rejected, margin, center_rewards_coefficient)
    metrics = reward_metrics(chosen, rejected)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


# --------------------------------------------------------------------------- recipe


class RewardModelRecipe:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp = ctx.hyperparameters_as(RewardModelHyperparameters)
        self.is_lora = isinstance(ctx.training_type, LoraTraining)
        self.last_eval: dict[str, float] = {}
        #: margin growth and the train/eval accuracy gap apply to a reward model too (no reference, so
        #: no displacement or drift): ``workers.signals``, docs/overoptimization.md
        self.signals = OverOptimization(lambda message, data: ctx.reporter.event(message, level="warn", data=data),
                                        margin="margin", accuracy="accuracy")

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        begun = start(ctx, hp)
        self.accelerator, self.tokenizer = begun.accelerator, begun.tokenizer
        self.pairs = self._tokenize(ctx.read_jsonl(ctx.training_file_key), "training_file")
        self.eval_pairs = (self._tokenize(ctx.read_jsonl(ctx.validation_file_key), "validation_file")
                           if ctx.validation_file_key else [])
        torch.manual_seed(ctx.seed)  # the new head's initialisation
        base = load_classifier_base(begun.base_dir, begun.precision.weights, self.tokenizer.pad_token_id,
                                    ctx.store, ctx.parent_adapter_keys)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(base)
        self.layout = choose_layout("packed", base.config, self.accelerator.device, wanted=hp.packing)
        if self.layout.flex:
            use_flex(base)
        self.model = apply_training_type(base, ctx.training_type, ctx.seed, task_type="SEQ_CLS")
        lengths = [len(pair) for pair in self.pairs]
        self.batches_by_epoch = [B.length_bucketed_batches(lengths, hp.batch_size, seed=ctx.seed + epoch)
                                 for epoch in range(hp.n_epochs)]
        self.plan = plan_steps(len(self.batches_by_epoch[0]), hp)
        self.scorer, self.optim = prepare_training(begun, SequenceScores(self.model), self.model, hp,
                                                   self.plan.total_steps)
        self.weights = result_weights(begun, self.model, self.tokenizer, self.optim)

    def _tokenize(self, rows: list[dict[str, Any]], param: str) -> list[D.TokenizedPair]:
        pairs, truncated = [], 0
        for row in rows:
            tokenized = D.tokenize_preference(D.normalize_preference(row), self.tokenizer, self.hp.max_length)
            if tokenized is None:
                continue
            truncated += int(tokenized.truncated)
            pairs.append(tokenized)
        if not pairs:
            code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
            raise JobFailure(code, f"{param}: no pair has a completion within "
                                   f"max_length={self.hp.max_length}", param)
        skipped = len(rows) - len(pairs)
        if truncated or skipped:
            self.ctx.reporter.event(
                f"{truncated + skipped} of {len(rows)} pairs in {param} were truncated to max_length="
                f"{self.hp.max_length}" + (f"; {skipped} of them had no completion left and were skipped"
                                           if skipped else ""),
                level="warn", data={"truncated": truncated, "skipped": skipped, "file": param})
        return pairs

    # one micro-batch -----------------------------------------------------------------------------
    def _scores(self, pairs: list[D.TokenizedPair]) -> tuple[Tensor, dict[str, Tensor], int]:
        """Rewards ``[chosen..., rejected...]``, the batch's ``margin`` (if any) and its real tokens."""
        device = self.accelerator.device
        if self.layout.name != "padded":
            sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
            packed = P.pack(sequences, self.hp.max_length, self.tokenizer.pad_token_id,
                            bucket=self.layout.flex).to(device, flex=self.layout.flex)
            scores = self.scorer(packed.input_ids, packed.attention_mask, position_ids=packed.position_ids,
                                 last=packed.last)
            margin = ({"margin": torch.tensor([p.margin or 0.0 for p in pairs], device=device)}
                      if any(p.margin is not None for p in pairs) else {})
            return scores, margin, packed.tokens
        batch = B.collate_pairs(pairs, self.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        return self.scorer(batch["input_ids"], batch["attention_mask"]), batch, int(batch["attention_mask"].sum())

    def _micro(self, indices: list[int]) -> tuple[Tensor, dict[str, float], int]:
        scores, batch, tokens = self._scores([self.pairs[i] for i in indices])
        loss, metrics = pair_loss(scores, batch, self.hp.center_rewards_coefficient)
        return loss, metrics, tokens

    def _step(self, group: list[list[int]]) -> tuple[dict[str, float], int]:
        metrics, tokens = accumulate(self.accelerator, self.scorer, group, self._micro, example_weights(group))
        return self.signals.after_step(metrics), tokens

    # train ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        ctx, hp, plan = self.ctx, self.hp, self.plan
        kind = "LoRA" if self.is_lora else "full"
        ctx.reporter.event(f"Fine-tuning started: reward model ({kind}, Bradley-Terry) on {ctx.model}, "
                           f"{len(self.pairs)} pairs, {plan.total_steps} steps",
                           data={"total_steps": plan.total_steps, "pairs": len(self.pairs)})
        report_layout(ctx, self.layout, [[len(self.pairs[i].chosen) for i in indices]
                                         + [len(self.pairs[i].rejected) for i in indices]
                                         for indices in self.batches_by_epoch[0]], hp.max_length)
        result = run_training(ctx=ctx, hp=hp, model=self.scorer, optim=self.optim,
                              weights=self.weights,
                              batches_by_epoch=self.batches_by_epoch, total_steps=plan.total_steps,
                              step_fn=gradient_step(self.optim, self._step), checkpoint_metrics=CHECKPOINT_METRICS,
                              evaluate=self.evaluate if self.eval_pairs else None, extra_state=self.signals)
        return TrainResult(result.status, result.tokens, result.metrics, adapter_key=result.adapter_key,
                           summary={"steps": result.step, "trained_tokens": result.tokens, **self.last_eval})

    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and metrics over the whole validation file at once (not averaged over batches)."""
        self.scorer.eval()
        chosen, rejected, margins = [], [], []
        with torch.no_grad():
            for indices in B.length_bucketed_batches([len(p) for p in self.eval_pairs], self.hp.batch_size,
                                                     seed=0, shuffle=False):
                if stopping(self.ctx):
                    self.scorer.train()
                    return {}
                pairs = [self.eval_pairs[i] for i in indices]
                scores, _, _ = self._scores(pairs)
                chosen.append(scores[:len(pairs)])
                rejected.append(scores[len(pairs):])
                margins += [pair.margin or 0.0 for pair in pairs]
        self.scorer.train()
        scores = torch.cat(chosen + rejected)
        has_margins = any(p.margin is not None for p in self.eval_pairs)
        batch = {"margin": torch.tensor(margins)} if has_margins else {}
        _, metrics = pair_loss(scores, batch, self.hp.center_rewards_coefficient)
        result = {f"eval/{k}": v for k, v in metrics.items()}
        result |= self.signals.after_eval(step, result["eval/accuracy"])
        self.last_eval = result
        self.ctx.reporter.metrics_only(step, result)
        self.ctx.reporter.event(f"Eval at step {step}: loss={result['eval/loss']:.4f}, "
                                f"accuracy={result['eval/accuracy']:.3f}", data={"step": step, **result})
        return result

    def cleanup(self) -> None:
        release(self, "scorer", "model", "optim", "weights")


__all__ = ["RewardModelRecipe", "pair_loss"]
