"""DPO recipe: LoRA (or full) preference optimisation of a causal LM with accelerate + peft.

Features
- Reference = the same base with adapters disabled (LoRA): one copy of the weights in memory.
  Full fine-tunes keep a frozen copy as the reference.
- Chosen and rejected run in one forward pass; the LM head runs on completion tokens only.
- Loss family from ``workers.losses`` (sigmoid DPO, IPO, hinge, robust; RPO's NLL via ``sft_weight``).
- TRL's metric names; checkpoints every ``checkpoint_every_steps`` and at the end.

Assumptions
- Pairs are validated at upload and tokenised through ``workers.data`` (chat template, prompt as the
  shared prefix, completion = the final assistant turn with its end-of-turn token once).
- At step 1 the LoRA update is zero (B is zero-initialised), so policy == reference and the
  sigmoid loss is exactly ln 2: the first logged loss doubles as a correctness check.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import torch
from torch import nn

from service.jobs.spec import DpoHyperparameters, LoraTraining
from workers import data as D
from workers.base_models import load_tokenizer, resolve_base_model
from workers.checkpointing import checkpoint_key, final_adapter_key
from workers.context import JobContext, JobFailure, TrainResult
from workers.losses import dpo_loss, dpo_metrics, rpo_nll_loss
from workers.modeling import (SequenceLogps, apply_training_type, load_causal_lm, merge_adapter,
                              pick_dtype, trainable_parameters)
from workers.training import grad_norm, make_accelerator, make_optimizer, plan_steps, save_model_archive


class DPORecipe:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.hp: DpoHyperparameters = ctx.hyperparameters  # type: ignore[assignment]
        self.is_lora = isinstance(ctx.training_type, LoraTraining)

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        torch.manual_seed(ctx.seed)
        random.seed(ctx.seed)
        self.accelerator = make_accelerator(hp)
        base_dir = resolve_base_model(ctx.base_model, ctx.settings)
        self.tokenizer = load_tokenizer(base_dir)
        dtype = pick_dtype(self.accelerator.device)
        base = load_causal_lm(base_dir, dtype)
        for key in ctx.parent_adapter_keys:
            base = merge_adapter(base, ctx.store, key)
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        self.reference: nn.Module | None = None
        if not self.is_lora:
            self.reference = SequenceLogps(copy.deepcopy(base).requires_grad_(False).eval())
        self.model = apply_training_type(base, ctx.training_type, ctx.seed)
        self.pairs = self._tokenize(ctx.read_jsonl(ctx.training_file_key), "training_file")
        self.eval_pairs = (self._tokenize(ctx.read_jsonl(ctx.validation_file_key), "validation_file")
                           if ctx.validation_file_key else [])
        lengths = [len(p) for p in self.pairs]
        self.batches_by_epoch = [D.length_bucketed_batches(lengths, hp.batch_size, seed=ctx.seed + epoch)
                                 for epoch in range(hp.n_epochs)]
        self.plan = plan_steps(len(self.batches_by_epoch[0]), hp)
        self.params = trainable_parameters(self.model)
        optimizer, scheduler = make_optimizer(self.params, hp, self.plan.total_steps)
        self.policy = SequenceLogps(self.model)
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy, optimizer, scheduler)
        if self.reference is not None:
            self.reference = self.reference.to(self.accelerator.device)

    def _tokenize(self, rows: list[dict[str, Any]], param: str) -> list[Any]:
        pairs, truncated = [], 0
        for row in rows:
            tokenized = D.tokenize_preference(D.normalize_preference(row), self.tokenizer, self.hp.max_length)
            if tokenized is None:
                continue
            truncated += int(tokenized.truncated)
            pairs.append(tokenized)
        if not pairs:
            raise JobFailure("invalid_training_file" if param == "training_file" else "invalid_validation_file",
                             f"{param}: no pair has a trainable completion within max_length={self.hp.max_length}",
                             param)
        if truncated:
            self.ctx.reporter.event(f"{truncated} of {len(rows)} pairs in {param} were truncated to "
                                    f"max_length={self.hp.max_length}", level="warn",
                                    data={"truncated": truncated, "file": param})
        return pairs

    # the loss on one micro-batch -----------------------------------------------------------------
    def _batch(self, pairs: list[Any]) -> dict[str, torch.Tensor]:
        batch = D.collate_pairs(pairs, self.tokenizer.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                logps, _ = self.reference(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            else:
                with self.accelerator.unwrap_model(self.policy).model.disable_adapter():
                    logps, _ = self.policy(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        return logps.detach()

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        hp = self.hp
        half = batch["input_ids"].shape[0] // 2
        ref = self._reference_logps(batch)
        logps, counts = self.policy(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        out = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta=hp.beta,
                       loss_type=hp.loss_type, label_smoothing=hp.label_smoothing,
                       chosen_token_counts=counts[:half], rejected_token_counts=counts[half:])
        loss = out.losses.mean()
        metrics = dpo_metrics(out, logps[:half].detach(), logps[half:].detach())
        if hp.sft_weight > 0:
            nll = rpo_nll_loss(logps[:half], counts[:half])
            loss = loss + hp.sft_weight * nll
            metrics["nll_loss"] = float(nll.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    # train ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        ctx, hp, plan = self.ctx, self.hp, self.plan
        reporter = ctx.reporter
        reporter.event(f"Fine-tuning started: DPO ({hp.loss_type}, beta={hp.beta}) on {ctx.model}, "
                       f"{len(self.pairs)} pairs, {plan.total_steps} steps",
                       data={"total_steps": plan.total_steps, "pairs": len(self.pairs)})
        reporter.progress(step=0, total_steps=plan.total_steps)
        step, tokens = 0, 0
        last: dict[str, float] = {}
        self.policy.train()
        for epoch in range(hp.n_epochs):
            batches = self.batches_by_epoch[epoch]
            for start in range(0, len(batches), hp.gradient_accumulation_steps):
                if step >= plan.total_steps:
                    break
                if reporter.should_stop():
                    reporter.event("Training stopped: the job was cancelled", level="warn")
                    return TrainResult("cancelled", tokens, last)
                began = time.perf_counter()
                group = batches[start:start + hp.gradient_accumulation_steps]
                accumulated: dict[str, float] = {}
                step_tokens = 0
                for indices in group:
                    batch = self._batch([self.pairs[i] for i in indices])
                    step_tokens += int(batch["attention_mask"].sum())
                    loss, metrics = self._loss(batch)
                    self.accelerator.backward(loss / len(group))
                    for k, v in metrics.items():
                        accumulated[k] = accumulated.get(k, 0.0) + v / len(group)
                if not torch.isfinite(torch.tensor(accumulated["loss"])):
                    raise JobFailure("nan_loss", f"loss became {accumulated['loss']} at step {step + 1}")
                self.accelerator.clip_grad_norm_(self.params, hp.max_grad_norm)
                accumulated["grad_norm"] = grad_norm(self.params)
                accumulated["learning_rate"] = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += step_tokens
                elapsed = time.perf_counter() - began
                accumulated["num_tokens"] = float(tokens)
                accumulated["tokens_per_second"] = step_tokens / max(elapsed, 1e-9)
                accumulated["epoch"] = epoch + (start + len(group)) / len(batches)
                reporter.step(step, plan.total_steps, accumulated, trained_tokens=tokens)
                last = accumulated
                if self.eval_pairs and hp.eval_every_steps and step % hp.eval_every_steps == 0:
                    self.evaluate(step)
                if hp.checkpoint_every_steps and step % hp.checkpoint_every_steps == 0 and step < plan.total_steps:
                    self.save_checkpoint(step, last)
        if self.eval_pairs:
            self.evaluate(step)
        self.save_checkpoint(step, last)
        key = save_model_archive(ctx, self.accelerator.unwrap_model(self.policy).model, self.tokenizer,
                                 final_adapter_key(ctx.job_id))
        return TrainResult("succeeded", tokens, last, adapter_key=key)

    def evaluate(self, step: int) -> dict[str, float]:
        self.policy.eval()
        totals: dict[str, float] = {}
        n = 0
        with torch.no_grad():
            for indices in D.length_bucketed_batches([len(p) for p in self.eval_pairs], self.hp.batch_size,
                                                     seed=0, shuffle=False):
                batch = self._batch([self.eval_pairs[i] for i in indices])
                _, metrics = self._loss(batch)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v * len(indices)
                n += len(indices)
        self.policy.train()
        result = {f"eval/{k}": v / n for k, v in totals.items()}
        self.ctx.reporter.metrics_only(step, result)
        self.ctx.reporter.event(f"Eval at step {step}: loss={result['eval/loss']:.4f}, "
                                f"accuracy={result['eval/rewards/accuracies']:.3f}", type="metrics",
                                data={"step": step, **result})
        return result

    def save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        model = self.accelerator.unwrap_model(self.policy).model
        key = save_model_archive(self.ctx, model, self.tokenizer, checkpoint_key(self.ctx.job_id, step))
        self.ctx.reporter.checkpoint(step, {k: v for k, v in metrics.items() if k in CHECKPOINT_METRICS}, key)

    def cleanup(self) -> None:
        self.accelerator.free_memory()
        for name in ("policy", "model", "reference", "optimizer"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


CHECKPOINT_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")
