"""Supervised fine-tuning recipe: LoRA (or full) next-token training of a causal LM on chats.

Features
- Trains exactly the tokens ``workers.data.tokenize_supervised`` marks: every assistant turn whose
  ``weight`` is not 0, with its end-of-turn token; never system/user turns or assistant headers.
- Loss = mean negative log-likelihood over the trained tokens of an optimizer step. Under gradient
  accumulation each micro-batch is weighted by its share of the step's trained tokens, so the loss
  is the same whatever the split (TRL's ``num_items_in_batch`` behaviour).
- The LM head runs on trained positions only, a chunk of tokens at a time
  (``workers.token_logps.TokenLogps``, ``workers.logprobs``).
- ``packing`` (default on): each micro-batch's examples are packed into rows of ``max_length``
  tokens (``workers.packing``: best-fit decreasing, positions restart per example, a document mask),
  so no padding is computed; the loss is the same per-token mean. The layout (``packed_flex`` on
  CUDA, ``packed_positions`` on SDPA, ``padded`` where the model takes no custom mask or packing is
  off) and the padding share before and after packing are reported in one event at the start.
- Metrics (TRL's names): ``loss``, ``mean_token_accuracy`` (argmax == target over trained tokens),
  ``num_tokens`` (cumulative tokens processed), ``grad_norm`` (before clipping), ``learning_rate``,
  ``tokens_per_second``; ``eval/loss`` and ``eval/mean_token_accuracy`` on the validation file
  every ``eval_every_steps`` and at the end.
- Checkpoints every ``checkpoint_every_steps`` and at the end; the final archive is a peft adapter
  (LoRA) or full safetensors weights with the tokenizer (``training_type: full``).
- Several ranks: DDP, or FSDP2 for a full fine-tune whose strategy is ``fsdp`` (``workers.fsdp``:
  sharded checkpoints, a gathered final model).
- Chaining: a ``model`` that is a fine-tuned model has its parents' weights merged into the base.

Assumptions
- Files were validated at upload (one supervised format, at least one weighted assistant turn).
- Conversations are cut on the right at ``max_length``; an example left with no trained token is
  skipped with a warning event, and a training file with no trainable token at all fails the job
  with ``invalid_training_file`` (``invalid_validation_file`` for the validation file).
- ``trained_tokens`` counts every token processed (prompt and completion), as the API bills it.
"""

from __future__ import annotations

from typing import Any

import torch

from service.jobs.spec import LoraTraining, SupervisedHyperparameters
from workers import batching as B
from workers import data as D
from workers import packing as P
from workers.attention import choose_layout, use_flex
from workers.context import JobContext, JobFailure, TrainResult
from workers.loop import accumulate, gradient_step, plan_steps, run_training
from workers.modeling import apply_training_type, enable_activation_checkpointing, load_base
from workers.recipes.common import prepare_training, release, report_layout, result_weights, start, stopping
from workers.token_logps import TokenLogps, token_nll

CHECKPOINT_METRICS = ("loss", "mean_token_accuracy", "learning_rate")


class SFTRecipe:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp = ctx.hyperparameters_as(SupervisedHyperparameters)
        self.is_lora = isinstance(ctx.training_type, LoraTraining)
        self.last_eval: dict[str, float] = {}

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        begun = start(ctx, hp)
        self.accelerator, self.tokenizer = begun.accelerator, begun.tokenizer
        self.examples = self._tokenize(ctx.read_jsonl(ctx.training_file_key), "training_file")
        self.eval_examples = (self._tokenize(ctx.read_jsonl(ctx.validation_file_key), "validation_file")
                              if ctx.validation_file_key else [])
        self.trained_counts = [sum(example.loss_mask) for example in self.examples]
        base = load_base(begun.base_dir, begun.precision.weights, ctx.store, ctx.parent_adapter_keys)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(base)
        self.layout = choose_layout("packed", base.config, self.accelerator.device, wanted=hp.packing)
        if self.layout.flex:
            use_flex(base)
        self.model = apply_training_type(base, ctx.training_type, ctx.seed)
        lengths = [len(example) for example in self.examples]
        self.batches_by_epoch = [B.length_bucketed_batches(lengths, hp.batch_size, seed=ctx.seed + epoch)
                                 for epoch in range(hp.n_epochs)]
        self.plan = plan_steps(len(self.batches_by_epoch[0]), hp)
        self.policy, self.optim = prepare_training(begun, TokenLogps(self.model), self.model, hp, self.plan.total_steps)
        self.weights = result_weights(begun, self.model, self.tokenizer, self.optim)

    def _tokenize(self, rows: list[dict[str, Any]], param: str) -> list[D.TokenizedExample]:
        max_length = self.hp.max_length
        examples, truncated, empty = [], 0, 0
        for row in rows:
            tokenized = D.tokenize_supervised(D.normalize_supervised(row), self.tokenizer, max_length)
            if tokenized is None:
                empty += 1
                continue
            truncated += int(tokenized.truncated)
            examples.append(tokenized)
        if not examples:
            code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
            raise JobFailure(code, f"{param}: no example has an assistant token to train on within "
                                   f"max_length={max_length} (all {len(rows)} were cut before their first "
                                   "trained assistant turn)", param)
        if truncated or empty:
            self.ctx.reporter.event(
                f"{truncated + empty} of {len(rows)} examples in {param} were truncated to "
                f"max_length={max_length}"
                + (f"; {empty} of them had no trained token left and were skipped" if empty else ""),
                level="warn", data={"truncated": truncated, "skipped": empty, "file": param})
        return examples

    # one micro-batch -----------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        return self.layout.name != "padded"

    def _forward(self, examples: list[D.TokenizedExample]) -> tuple[Any, int]:
        device = self.accelerator.device
        if self.packed:
            packed = P.pack(examples, self.hp.max_length, self.tokenizer.pad_token_id,
                            bucket=self.layout.flex).to(device, flex=self.layout.flex)
            predictions = self.policy(packed.input_ids, packed.attention_mask, packed.loss_mask,
                                      position_ids=packed.position_ids, rows=packed.documents)
            return predictions, packed.tokens
        batch = {k: v.to(device) for k, v in B.collate_supervised(examples, self.tokenizer.pad_token_id).items()}
        predictions = self.policy(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        return predictions, int(batch["attention_mask"].sum())

    def _micro(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]:
        predictions, tokens = self._forward([self.examples[i] for i in indices])
        loss, metrics = token_nll(predictions)
        return loss, metrics, tokens

    def _step(self, group: list[list[int]]) -> tuple[dict[str, float], int]:
        counts = [sum(self.trained_counts[i] for i in indices) for indices in group]
        total = sum(counts)
        return accumulate(self.accelerator, self.policy, group, self._micro, [c / total for c in counts])

    # train ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        ctx, hp, plan = self.ctx, self.hp, self.plan
        kind = "LoRA" if self.is_lora else "full"
        ctx.reporter.event(f"Fine-tuning started: supervised ({kind}) on {ctx.model}, {len(self.examples)} "
                           f"examples, {sum(self.trained_counts)} trained tokens, {plan.total_steps} steps",
                           data={"total_steps": plan.total_steps, "examples": len(self.examples)})
        report_layout(ctx, self.layout, [[len(self.examples[i]) for i in indices]
                                         for indices in self.batches_by_epoch[0]], hp.max_length)
        result = run_training(ctx=ctx, hp=hp, model=self.policy, optim=self.optim,
                              weights=self.weights,
                              batches_by_epoch=self.batches_by_epoch, total_steps=plan.total_steps,
                              step_fn=gradient_step(self.optim, self._step), checkpoint_metrics=CHECKPOINT_METRICS,
                              evaluate=self.evaluate if self.eval_examples else None)
        return TrainResult(result.status, result.tokens, result.metrics, adapter_key=result.adapter_key,
                           summary={"steps": result.step, "trained_tokens": result.tokens, **self.last_eval})

    def evaluate(self, step: int) -> dict[str, float]:
        self.policy.eval()
        nll, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for indices in B.length_bucketed_batches([len(e) for e in self.eval_examples], self.hp.batch_size,
                                                     seed=0, shuffle=False):
                if stopping(self.ctx):
                    self.policy.train()
                    return {}
                predictions, _ = self._forward([self.eval_examples[i] for i in indices])
                nll -= float(predictions.logps.sum())
                correct += int(predictions.correct.sum())
                count += predictions.logps.numel()
        self.policy.train()
        result = {"eval/loss": nll / max(count, 1), "eval/mean_token_accuracy": correct / max(count, 1)}
        self.last_eval = result
        self.ctx.reporter.metrics_only(step, result)
        self.ctx.reporter.event(f"Eval at step {step}: loss={result['eval/loss']:.4f}, "
                                f"mean_token_accuracy={result['eval/mean_token_accuracy']:.3f}",
                                data={"step": step, **result})
        return result

    def cleanup(self) -> None:
        release(self, "policy", "model", "optim", "weights")
