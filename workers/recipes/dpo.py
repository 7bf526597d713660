"""DPO recipe: LoRA (or full) preference optimisation of a causal LM with accelerate + peft.

Features
- Reference = the same base with adapters disabled (LoRA): one copy of the weights in memory.
  Full fine-tunes keep a frozen copy as the reference (none with ``precompute_ref_log_probs``);
  under FSDP2 (strategy ``fsdp``, ``workers.fsdp``) it is sharded over the ranks like the policy.
- Chosen and rejected run in one forward pass, and their shared prompt runs once: each pair is one
  row ``[prompt, chosen completion, rejected completion]`` whose attention mask keeps the two
  completions apart and whose position ids restart the rejected completion where the prompt ends
  (the "shared-prompt layout"). Every completion token sees exactly the context it has in its own
  sequence, so the log-probs equal those of the plain ``[chosen..., rejected...]`` padded batch up to
  float rounding, for about half the decoder work on typical pairs (no second copy of the prompt,
  no padding of the short side to the long one). On CUDA the mask is a flex-attention block mask
  (``shared_flex``: fused kernel, compiled once per length bucket), on the CPU a dense 4D mask on
  SDPA (``shared_mask``); ``workers.attention.choose_layout`` decides and an event says which runs
  and why. Checked once at setup against the plain layout on two pairs; models it does not suit
  (flash attention, sliding windows, attention dropout, or a failed check) use the plain layout
  (chosen and rejected as separate padded rows, SDPA causal).
- The LM head runs on completion tokens only (the hidden states that predict one).
- ``precompute_ref_log_probs``: the reference log-probs of every training and validation pair are
  computed once before the first step (no gradients, the training batches of epoch 1, so step 1 sees
  bit-identical numbers), stored with the job as ``jobs/<id>/ref_logps.safetensors`` (per pair index,
  with a fingerprint of the tokenised data, base model and dtype) and reused when the job runs again;
  steps then run no reference forward at all. An event reports the time it took (or the reuse).
- No host synchronisation per micro-batch: losses and metrics stay on the device and are converted
  once per optimizer step (plus the gradient norm in ``workers.loop``).
- Loss family from ``workers.losses`` (sigmoid DPO, IPO, hinge, robust; RPO's NLL via ``sft_weight``).
- TRL's metric names; checkpoints every ``checkpoint_every_steps`` and at the end (``workers.loop``).
  Gradient accumulation weights micro-batches by their share of the step's pairs.

Assumptions
- Pairs are validated at upload and tokenised through ``workers.data`` (chat template, prompt as the
  shared prefix, completion = the final assistant turn with its end-of-turn token once).
- At step 1 the LoRA update is zero (B is zero-initialised), so policy == reference and the
  sigmoid loss is exactly ln 2: the first logged loss doubles as a correctness check.
- The reference pass runs in eval mode (no dropout) under ``torch.no_grad``: a fixed reference, as
  TRL's (which disables dropout altogether). ``torch.inference_mode`` measured no faster on CPU and
  would turn buffers some models update during a forward into inference tensors, so it is not used.
- The causal LM's logits are ``lm_head(last_hidden_state)`` (see ``workers.modeling``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from service.jobs.spec import DpoHyperparameters, LoraTraining
from service.storage import ObjectNotFound
from workers import batching as B
from workers import data as D
from workers.attention import SDPA_OR_FLEX, Layout, choose_layout, use_flex
from workers.context import JobContext, JobFailure, TrainResult
from workers.loop import backward, gradient_step, plan_steps, run_training, sync_if
from workers.losses import dpo_loss, rpo_nll_loss
from workers.modeling import apply_training_type, causal_lm_of, enable_activation_checkpointing, load_base
from workers.pairs import LAYOUT_TOLERANCE, PairBatch, PairLogps, collate_plain, collate_shared
from workers.recipes.common import prepare_frozen, prepare_training, release, result_weights, start
from workers.retention import RetentionProbe, greedy_answers
from workers.signals import OverOptimization, pair_signals

#: the tensors ``workers.signals.pair_signals`` takes, in its order
_SIGNAL_PARTS = ("logps_chosen", "logps_rejected", "ref_chosen", "ref_rejected", "counts_chosen", "counts_rejected")
SIGNAL_METRICS = ("signals/displacement", "logps/chosen_drift", "logps/rejected_drift")
CHECKPOINT_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")


def ref_logps_key(job_id: str) -> str:
    return f"jobs/{job_id}/ref_logps.safetensors"


# --------------------------------------------------------------------------- metrics


class _Tally:
    """A step's (or an evaluation's) losses and rewards, kept on the device until :meth:`values`."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}
        self.weighted: dict[str, Tensor] = {}

    def add(self, stats: dict[str, Tensor], weight: float) -> None:
        for name in ("chosen_rewards", "rejected_rewards", *_SIGNAL_PARTS):
            self.parts.setdefault(name, []).append(stats[name])
        for name in ("loss", "nll_loss"):
            if name in stats:
                self.weighted[name] = self.weighted.get(name, 0.0) + stats[name] * weight

    def values(self, prefix: str = "") -> dict[str, float]:
        """TRL's DPO metrics (the definitions of ``workers.losses.dpo_metrics``) over every pair seen,
        converted to floats in one transfer. NaN when nothing was added (a rank with no evaluation slice)."""
        if not self.parts:
            names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "rewards/chosen_below_zero", *SIGNAL_METRICS)
            return {prefix + name: math.nan for name in names}
        chosen, rejected = (torch.cat(self.parts[k]).float() for k in ("chosen_rewards", "rejected_rewards"))
        named = {
            **self.weighted,
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": torch.cat(self.parts["logps_chosen"]).float().mean(),
            "logps/rejected": torch.cat(self.parts["logps_rejected"]).float().mean(),
            "rewards/chosen_below_zero": (chosen < 0).float().mean(),
            **pair_signals(*(torch.cat(self.parts[k]) for k in _SIGNAL_PARTS)),
        }
        floats = torch.stack([v.float() for v in named.values()]).tolist()
        return {prefix + k: v for k, v in zip(named, floats, strict=True)}


# --------------------------------------------------------------------------- recipe


class DPORecipe:
    def __init__(self, ctx: JobContext, *, plain_layout: bool = False) -> None:
        """``plain_layout``: run the plain padded layout even where the shared-prompt one would be
        chosen. Not a hyperparameter (the layouts give the same log-probs): ``bench/dpo_vs_trl.py``
        uses it to measure how much of the speedup the layout is."""
        self.ctx = ctx
        self.plain_layout = plain_layout
        self.hp = ctx.hyperparameters_as(DpoHyperparameters)
        self.is_lora = isinstance(ctx.training_type, LoraTraining)
        self.last_eval: dict[str, float] = {}
        self.stored_ref: dict[str, Tensor] | None = None
        self.signals = OverOptimization(lambda message, data: ctx.reporter.event(message, level="warn", data=data))

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        begun = start(ctx, hp)
        self.accelerator, self.tokenizer, self.precision = begun.accelerator, begun.tokenizer, begun.precision
        base = load_base(begun.base_dir, begun.precision.weights, ctx.store, ctx.parent_adapter_keys)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(base)
        self.reference: nn.Module | None = None
        frozen = (copy.deepcopy(base).requires_grad_(False).eval()
                  if not self.is_lora and not hp.precompute_ref_log_probs else None)
        self.layout = (Layout("plain", "the plain layout was asked for") if self.plain_layout
                       else choose_layout("pairs", base.config, self.accelerator.device))
        if self.layout.flex:
            for model in (base, frozen):
                if model is not None:
                    use_flex(model)
        self.model = apply_training_type(base, ctx.training_type, ctx.seed)
        self.pairs = self._tokenize(ctx.read_jsonl(ctx.training_file_key), "training_file")
        self.eval_pairs = (self._tokenize(ctx.read_jsonl(ctx.validation_file_key), "validation_file")
                           if ctx.validation_file_key else [])
        lengths = [len(p) for p in self.pairs]
        self.batches_by_epoch = [B.length_bucketed_batches(lengths, hp.batch_size, seed=ctx.seed + epoch)
                                 for epoch in range(hp.n_epochs)]
        self.eval_batches = B.length_bucketed_batches([len(p) for p in self.eval_pairs], hp.batch_size,
                                                      seed=0, shuffle=False) if self.eval_pairs else []
        self.plan = plan_steps(len(self.batches_by_epoch[0]), hp)
        self.policy, self.optim = prepare_training(begun, PairLogps(self.model), self.model, hp, self.plan.total_steps)
        self.weights = result_weights(begun, self.model, self.tokenizer, self.optim)
        if frozen is not None:  # sharded like the policy under FSDP
            self.reference = prepare_frozen(begun, PairLogps(frozen), frozen)
        lm = causal_lm_of(self.model)
        self.mask_dtype = None if lm.config._attn_implementation in ("sdpa", SDPA_OR_FLEX) else lm.dtype
        self.shared_layout = self._check_shared_layout(lm)
        if not self.shared_layout and self.layout.name != "plain":
            self.layout = Layout("plain", "the shared-prompt check failed")
        ctx.reporter.event(f"Attention layout: {self.layout.name} ({self.layout.reason})",
                           data={"layout": self.layout.name, "reason": self.layout.reason})
        self.retention = self._retention_probe()

    def _retention_probe(self) -> RetentionProbe | None:
        """The probe ``retention_file`` names (``workers.retention``), run at each evaluation."""
        key = self.ctx.file_keys.get("retention_file")
        if key is None or self.hp.retention_grader is None or not self.eval_pairs:
            return None
        from service.graders import Sandbox, uses_python

        sandbox = Sandbox.from_settings(self.ctx.settings.graders) if uses_python(self.hp.retention_grader) else None
        return RetentionProbe.build(self.ctx.read_jsonl(key), self.hp.retention_grader, self.tokenizer,
                                    self.hp.retention_max_new_tokens, sandbox)

    def _answers(self, base: bool) -> list[str]:
        """Greedy probe answers of the policy, or of the base (LoRA: adapters disabled)."""
        assert self.retention is not None
        from workers.modeling import eos_token_ids

        lm = causal_lm_of(self.model)

        def answer() -> list[str]:
            return greedy_answers(self.model, self.tokenizer, self.retention.prompt_ids,  # type: ignore[union-attr]
                                  max_new_tokens=self.hp.retention_max_new_tokens,
                                  eos_ids=eos_token_ids(lm, self.tokenizer), device=self.accelerator.device)

        with torch.no_grad(), self.accelerator.autocast():
            if base and self.is_lora:
                with self.model.disable_adapter():  # type: ignore[operator]
                    return answer()
            return answer()

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
            raise JobFailure(code, f"{param}: no pair has a trainable completion within "
                                   f"max_length={self.hp.max_length}", param)
        if truncated:
            self.ctx.reporter.event(f"{truncated} of {len(rows)} pairs in {param} were truncated to "
                                    f"max_length={self.hp.max_length}", level="warn",
                                    data={"truncated": truncated, "file": param})
        return pairs

    def _check_shared_layout(self, lm: Any) -> bool:
        """Compare both layouts on two pairs; any model the shared one does not suit gets the plain one."""
        if self.plain_layout:  # asked for: the layout event says so, no warning
            return False
        if self.layout.name == "plain":
            reason = self.layout.reason
        else:
            pairs = self.pairs[:2]
            with torch.no_grad():
                shared, counts = self._reference_logps(self._collate(pairs, shared=True))
                plain, _ = self._reference_logps(self._collate(pairs, shared=False))
            error = float(((shared - plain).abs() / counts.clamp(min=1)).max())
            if error <= LAYOUT_TOLERANCE:
                return True
            reason = f"a per-token difference of {error:.3g} from the plain layout"
        self.ctx.reporter.event(f"Shared-prompt batching is off for this model ({reason}); chosen and "
                                "rejected are padded to one width instead", level="warn")
        return False

    # one micro-batch -----------------------------------------------------------------------------
    def _collate(self, pairs: list[D.TokenizedPair], shared: bool | None = None) -> PairBatch:
        shared = self.shared_layout if shared is None else shared
        pad = self.tokenizer.pad_token_id
        batch = collate_shared(pairs, pad, flex=self.layout.flex) if shared else collate_plain(pairs, pad)
        return batch.to(self.accelerator.device, self.mask_dtype)

    def _reference_logps(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        """The reference's ``(sums, counts)``: no gradients, no autograd graph, eval mode (no dropout)."""
        # Without a frozen copy: LoRA with adapters disabled, or (full, precompute) the policy before step 1.
        module: nn.Module = (self.reference if self.reference is not None
                             else self.accelerator.unwrap_model(self.policy))
        was_training = module.training
        module.eval()
        try:
            # the same autocast as the policy's forward (accelerate wraps only the prepared module)
            with torch.no_grad(), self.accelerator.autocast():
                if self.is_lora:
                    with module.model.disable_adapter():  # type: ignore[operator,union-attr]
                        return module(batch)  # type: ignore[no-any-return]
                return module(batch)  # type: ignore[no-any-return]
        finally:
            module.train(was_training)

    def _loss(self, batch: PairBatch, ref: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss with gradients and the pair statistics, detached, on the device (no host sync)."""
        hp = self.hp
        half = batch.n_pairs
        if ref is None:
            ref, _ = self._reference_logps(batch)
        logps, counts = self.policy(batch)
        out = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta=hp.beta,
                       loss_type=hp.loss_type, label_smoothing=hp.label_smoothing,
                       chosen_token_counts=counts[:half], rejected_token_counts=counts[half:])
        loss = out.losses.mean()
        stats = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
                 "logps_chosen": logps[:half].detach(), "logps_rejected": logps[half:].detach(),
                 "ref_chosen": ref[:half], "ref_rejected": ref[half:],
                 "counts_chosen": counts[:half], "counts_rejected": counts[half:]}
        if hp.sft_weight > 0:
            nll = rpo_nll_loss(logps[:half], counts[:half])
            loss = loss + hp.sft_weight * nll
            stats["nll_loss"] = nll.detach()
        stats["loss"] = loss.detach()
        return loss, stats

    def _stored(self, split: str, indices: list[int]) -> Tensor | None:
        """Precomputed reference log-probs of these pairs as ``[chosen..., rejected...]``."""
        if self.stored_ref is None:
            return None
        rows = self.stored_ref[split][torch.tensor(indices, device=self.stored_ref[split].device)]
        return torch.cat([rows[:, 0], rows[:, 1]])

    def _step(self, group: list[list[int]]) -> tuple[dict[str, float], int]:
        """Forward/backward every micro-batch of one optimizer step; one host transfer at the end."""
        total = sum(len(indices) for indices in group)
        tally, tokens = _Tally(), 0
        for position, indices in enumerate(group):
            weight = len(indices) / total
            batch = self._collate([self.pairs[i] for i in indices])
            with sync_if(self.accelerator, self.policy, position == len(group) - 1):
                loss, stats = self._loss(batch, self._stored("train", indices))
                backward(self.accelerator, loss * weight)
            tally.add(stats, weight)
            tokens += batch.tokens
        return self.signals.after_step(tally.values()), tokens

    # reference log-probs, once -------------------------------------------------------------------
    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(repr((self.ctx.base_model, self.ctx.parent_adapter_keys, str(self.precision))).encode())
        for split in (self.pairs, self.eval_pairs):
            digest.update(b"|split|")
            for pair in split:
                for side in (pair.chosen, pair.rejected):
                    digest.update(repr((side.input_ids, side.loss_mask)).encode())
        return digest.hexdigest()

    def _splits(self) -> list[tuple[str, list[D.TokenizedPair], list[list[int]]]]:
        """Each split with batches that cover all its pairs: the training (evaluation) batches in one
        process, so step 1 sees bit-identical numbers; under several ranks, whose batches are slices,
        length-sorted batches of every pair (each rank needs all pairs: epochs reshuffle them)."""
        splits = []
        for split, pairs, batches in (("train", self.pairs, self.batches_by_epoch[0]),
                                      ("validation", self.eval_pairs, self.eval_batches)):
            if not pairs:
                continue
            if sorted(i for indices in batches for i in indices) != list(range(len(pairs))):
                order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
                size = self.hp.batch_size
                batches = [order[i:i + size] for i in range(0, len(order), size)]
            splits.append((split, pairs, batches))
        return splits

    def _load_reference(self, key: str, fingerprint: str) -> dict[str, Tensor] | None:
        path = Path(self.ctx.workdir) / "ref_logps.safetensors"
        try:
            self.ctx.store.download_file(key, path)
        except (ObjectNotFound, FileNotFoundError):
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != fingerprint:
                    return None
                stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open API
        finally:
            path.unlink(missing_ok=True)
        sizes = {split: len(pairs) for split, pairs, _ in self._splits()}
        if set(stored) != set(sizes) or any(stored[s].shape != (n, 2) for s, n in sizes.items()):
            return None
        return stored

    def precompute_reference(self) -> dict[str, Tensor] | None:
        """Reference log-probs of every pair, loaded from the job's store or computed and stored.

        Returns None when a stop (cancel, pause, shutdown) arrives meanwhile: a resumed job computes it again.
        """
        ctx = self.ctx
        key, fingerprint = ref_logps_key(ctx.job_id), self._fingerprint()
        began = time.perf_counter()
        stored = self._load_reference(key, fingerprint)
        counts = {split: len(pairs) for split, pairs, _ in self._splits()}
        if stored is not None:
            ctx.reporter.event(f"Reusing the precomputed reference log-probs of {counts['train']} training "
                               f"pairs from {key}", data={"key": key, "reused": True, **counts})
        else:
            stored = {}
            for split, pairs, batches in self._splits():
                values = torch.empty(len(pairs), 2)
                for indices in batches:
                    if ctx.reporter.stop_reason() is not None:  # the loop acts on it before step 1
                        return None
                    sums, _ = self._reference_logps(self._collate([pairs[i] for i in indices]))
                    values[indices] = torch.stack(sums.float().cpu().chunk(2), dim=1)
                stored[split] = values
            if self.accelerator.is_main_process:
                path = Path(ctx.workdir) / "ref_logps.safetensors"
                save_file(stored, str(path), metadata={"fingerprint": fingerprint, **{
                    f"{s}_pairs": str(n) for s, n in counts.items()}})
                ctx.store.put_file(key, path)
                path.unlink(missing_ok=True)
            seconds = time.perf_counter() - began
            shown = ", ".join(f"{n} {s}" for s, n in counts.items())
            ctx.reporter.event(f"Precomputed reference log-probs of {shown} pairs in {seconds:.1f}s",
                               data={"key": key, "reused": False, "seconds": seconds, **counts})
        return {split: values.to(self.accelerator.device) for split, values in stored.items()}

    # train ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        ctx, hp, plan = self.ctx, self.hp, self.plan
        ctx.reporter.event(f"Fine-tuning started: DPO ({hp.loss_type}, beta={hp.beta}) on {ctx.model}, "
                           f"{len(self.pairs)} pairs, {plan.total_steps} steps",
                           data={"total_steps": plan.total_steps, "pairs": len(self.pairs)})
        if self.retention is not None and not self.is_lora:  # full: before step 1 the policy is the base
            if ctx.resume_from is None:
                self.retention.record_base(self._answers(base=True))
            else:
                self.retention = None
                ctx.reporter.event("The retention probe is off for this resumed full fine-tune: its base "
                                   "answers are no longer at hand", level="warn")
        if hp.precompute_ref_log_probs:
            self.stored_ref = self.precompute_reference()
            if self.stored_ref is None and ctx.reporter.stop_reason() == "cancel":
                ctx.reporter.event("Training stopped: the job was cancelled", level="warn")
                return TrainResult("cancelled", 0, {})
            # a pause or a shutdown: the loop checkpoints step 0 at its first check, before any step runs
        result = run_training(ctx=ctx, hp=hp, model=self.policy, optim=self.optim,
                              weights=self.weights,
                              batches_by_epoch=self.batches_by_epoch, total_steps=plan.total_steps,
                              step_fn=gradient_step(self.optim, self._step), checkpoint_metrics=CHECKPOINT_METRICS,
                              evaluate=self.evaluate if self.eval_pairs else None, extra_state=self.signals)
        return TrainResult(result.status, result.tokens, result.metrics, adapter_key=result.adapter_key,
                           summary={"steps": result.step, "trained_tokens": result.tokens, **self.last_eval})

    def evaluate(self, step: int) -> dict[str, float]:
        self.policy.eval()
        tally = _Tally()
        total = sum(len(indices) for indices in self.eval_batches)  # this rank's share under several
        with torch.no_grad():
            for indices in self.eval_batches:
                batch = self._collate([self.eval_pairs[i] for i in indices])
                _, stats = self._loss(batch, self._stored("validation", indices))
                tally.add(stats, len(indices) / total)
        result = tally.values(prefix="eval/")
        if self.retention is not None:
            if self.retention.base_right is None:
                self.retention.record_base(self._answers(base=True))
            result |= self.retention.metrics(self._answers(base=False))
        self.policy.train()
        result |= self.signals.after_eval(step, result["eval/rewards/accuracies"])
        self.last_eval = result
        self.ctx.reporter.metrics_only(step, result)
        retained = f", retention={result['eval/retention']:.3f}" if "eval/retention" in result else ""
        self.ctx.reporter.event(f"Eval at step {step}: loss={result['eval/loss']:.4f}, "
                                f"accuracy={result['eval/rewards/accuracies']:.3f}{retained}", type="metrics",
                                data={"step": step, **result})
        return result

    def cleanup(self) -> None:
        release(self, "policy", "model", "reference", "optim", "weights", "stored_ref")
