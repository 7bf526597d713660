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
- Loss = ``workers.losses.bradley_terry_loss`` with the data's per-pair ``margin`` (0 where a pair
  has none) and ``center_rewards_coefficient``; TRL's metrics ``loss``, ``accuracy``, ``margin``,
  ``reward/mean``, ``reward/min``, ``reward/max``, plus ``grad_norm`` and ``learning_rate``;
  ``eval/*`` of the same on the validation file every ``eval_every_steps`` and at the end.
- The final archive is the adapter (with the head) or the full classifier with its tokenizer; it is
  what a PPO job loads through :func:`load_reward_model` and scores with :func:`score`.

Assumptions
- Pairs are validated at upload and tokenised through ``workers.data`` exactly as for DPO (prompt
  with the assistant header, completion = final assistant turn with its end-of-turn token once).
- Sequences are right-padded (the collators in ``workers.data`` do so).
- ``trained_tokens`` counts every token processed, chosen and rejected, prompt and completion.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.jobs.spec import LoraTraining, RewardModelHyperparameters, TrainingType
from workers import data as D
from workers.base_models import load_tokenizer, resolve_base_model
from workers.checkpointing import checkpoint_key, final_adapter_key
from workers.context import JobContext, JobFailure, TrainResult
from workers.loop import accumulate, example_weights, run_training
from workers.losses import bradley_terry_loss, reward_metrics
from workers.modeling import load_causal_lm, merge_adapter, pick_dtype, trainable_parameters
from workers.training import make_accelerator, make_optimizer, plan_steps, save_model_archive

#: Names transformers gives a sequence classifier's head (Llama & most decoders: ``score``).
HEAD_NAMES = ("score", "classifier")

# --------------------------------------------------------------------------- model pieces


def load_sequence_classifier(path: str | Path, dtype: torch.dtype, pad_token_id: int) -> PreTrainedModel:
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=dtype, trust_remote_code=False, use_safetensors=True,
        local_files_only=True,
    )
    model.config.pad_token_id = pad_token_id  # HF's own forward needs it for batches > 1
    model.config.use_cache = False
    return model  # type: ignore[no-any-return]


def copy_decoder(classifier: PreTrainedModel, causal_lm: PreTrainedModel) -> None:
    """Give ``classifier`` the decoder weights of ``causal_lm`` (e.g. a base with parents merged)."""
    target = getattr(classifier, classifier.base_model_prefix)
    target.load_state_dict(getattr(causal_lm, causal_lm.base_model_prefix).state_dict())


def classifier_of(model: nn.Module) -> PreTrainedModel:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner  # type: ignore[return-value]


def score_head(classifier: nn.Module) -> nn.Module:
    for name in HEAD_NAMES:
        head = getattr(classifier, name, None)
        if isinstance(head, nn.Module):
            return head
    names = " or ".join(HEAD_NAMES)
    raise ValueError(f"{type(classifier).__name__} has no classification head named {names}")


def apply_reward_training_type(model: PreTrainedModel, training_type: TrainingType, seed: int) -> nn.Module:
    """LoRA (``SEQ_CLS``: the head is trained in full and saved with the adapter) or everything."""
    if isinstance(training_type, LoraTraining):
        torch.manual_seed(seed)
        config = LoraConfig(r=training_type.r,
                            lora_alpha=training_type.alpha,  # type: ignore[arg-type]  # peft says int; floats work
                            lora_dropout=training_type.dropout,
                            target_modules=list(training_type.target_modules),
                            task_type="SEQ_CLS", bias="none")
        names = [n for n, _ in model.named_modules()]
        missing = [m for m in config.target_modules or [] if not any(n.endswith(m) for n in names)]
        if missing:
            raise JobFailure("invalid_training_type",
                             f"training_type.target_modules: {missing} not found in the model",
                             "training_type.target_modules")
        return get_peft_model(model, config)
    model.requires_grad_(True)
    return model


class SequenceScores(nn.Module):
    """``forward(input_ids, attention_mask) -> [B]`` fp32 rewards at each row's last attended token.

    The head runs on those B hidden states only. A module so that accelerate/DDP wraps the whole
    computation (see ``workers.modeling.SequenceLogps``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        classifier = classifier_of(self.model)
        decoder = getattr(classifier, classifier.base_model_prefix)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return score_head(classifier)(pooled).squeeze(-1).float()  # type: ignore[no-any-return]


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
        self.hp: RewardModelHyperparameters = ctx.hyperparameters  # type: ignore[assignment]
        self.is_lora = isinstance(ctx.training_type, LoraTraining)
        self.last_eval: dict[str, float] = {}

    # setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, hp = self.ctx, self.hp
        torch.manual_seed(ctx.seed)
        random.seed(ctx.seed)
        self.accelerator = make_accelerator(hp)
        base_dir = resolve_base_model(ctx.base_model, ctx.settings)
        self.tokenizer = load_tokenizer(base_dir)
        self.pairs = self._tokenize(ctx.read_jsonl(ctx.training_file_key), "training_file")
        self.eval_pairs = (self._tokenize(ctx.read_jsonl(ctx.validation_file_key), "validation_file")
                           if ctx.validation_file_key else [])
        dtype = pick_dtype(self.accelerator.device)
        torch.manual_seed(ctx.seed)  # the new head's initialisation
        base = load_sequence_classifier(base_dir, dtype, self.tokenizer.pad_token_id)
        if ctx.parent_adapter_keys:
            lm = load_causal_lm(base_dir, dtype)
            for key in ctx.parent_adapter_keys:
                lm = merge_adapter(lm, ctx.store, key)
            copy_decoder(base, lm)
            del lm
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        self.model = apply_reward_training_type(base, ctx.training_type, ctx.seed)
        lengths = [len(pair) for pair in self.pairs]
        self.batches_by_epoch = [D.length_bucketed_batches(lengths, hp.batch_size, seed=ctx.seed + epoch)
                                 for epoch in range(hp.n_epochs)]
        self.plan = plan_steps(len(self.batches_by_epoch[0]), hp)
        self.params = trainable_parameters(self.model)
        optimizer, scheduler = make_optimizer(self.params, hp, self.plan.total_steps)
        prepared = self.accelerator.prepare(SequenceScores(self.model), optimizer, scheduler)
        self.scorer, self.optimizer, self.scheduler = prepared

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
    def _scores(self, pairs: list[D.TokenizedPair]) -> tuple[Tensor, dict[str, Tensor]]:
        batch = D.collate_pairs(pairs, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        return self.scorer(batch["input_ids"], batch["attention_mask"]), batch

    def _micro(self, indices: list[int]) -> tuple[Tensor, dict[str, float], int]:
        scores, batch = self._scores([self.pairs[i] for i in indices])
        loss, metrics = pair_loss(scores, batch, self.hp.center_rewards_coefficient)
        return loss, metrics, int(batch["attention_mask"].sum())

    def _step(self, group: list[list[int]]) -> tuple[dict[str, float], int]:
        return accumulate(self.accelerator, self.scorer, group, self._micro, example_weights(group))

    # train ---------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        ctx, hp, plan = self.ctx, self.hp, self.plan
        kind = "LoRA" if self.is_lora else "full"
        ctx.reporter.event(f"Fine-tuning started: reward model ({kind}, Bradley-Terry) on {ctx.model}, "
                           f"{len(self.pairs)} pairs, {plan.total_steps} steps",
                           data={"total_steps": plan.total_steps, "pairs": len(self.pairs)})
        result = run_training(ctx=ctx, hp=hp, accelerator=self.accelerator, model=self.scorer,
                              optimizer=self.optimizer, scheduler=self.scheduler, params=self.params,
                              batches_by_epoch=self.batches_by_epoch, total_steps=plan.total_steps,
                              step_fn=self._step, save_checkpoint=self.save_checkpoint,
                              evaluate=self.evaluate if self.eval_pairs else None)
        if result.status != "succeeded":
            return TrainResult(result.status, result.tokens, result.metrics)
        key = save_model_archive(ctx, self._model(), self.tokenizer,
                                 final_adapter_key(ctx.job_id, attempt=ctx.attempt))
        return TrainResult("succeeded", result.tokens, result.metrics, adapter_key=key,
                           summary={"steps": result.step, "trained_tokens": result.tokens, **self.last_eval})

    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and metrics over the whole validation file at once (not averaged over batches)."""
        self.scorer.eval()
        chosen, rejected, margins = [], [], []
        with torch.no_grad():
            for indices in D.length_bucketed_batches([len(p) for p in self.eval_pairs], self.hp.batch_size,
                                                     seed=0, shuffle=False):
                pairs = [self.eval_pairs[i] for i in indices]
                scores, _ = self._scores(pairs)
                chosen.append(scores[:len(pairs)])
                rejected.append(scores[len(pairs):])
                margins += [pair.margin or 0.0 for pair in pairs]
        self.scorer.train()
        scores = torch.cat(chosen + rejected)
        has_margins = any(p.margin is not None for p in self.eval_pairs)
        batch = {"margin": torch.tensor(margins)} if has_margins else {}
        _, metrics = pair_loss(scores, batch, self.hp.center_rewards_coefficient)
        result = {f"eval/{k}": v for k, v in metrics.items()}
        self.last_eval = result
        self.ctx.reporter.metrics_only(step, result)
        self.ctx.reporter.event(f"Eval at step {step}: loss={result['eval/loss']:.4f}, "
                                f"accuracy={result['eval/accuracy']:.3f}", data={"step": step, **result})
        return result

    def _model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.scorer).model  # type: ignore[no-any-return]

    def save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        key = checkpoint_key(self.ctx.job_id, step, attempt=self.ctx.attempt)
        save_model_archive(self.ctx, self._model(), self.tokenizer, key)
        self.ctx.reporter.checkpoint(step, {k: v for k, v in metrics.items() if k in CHECKPOINT_METRICS}, key)

    def cleanup(self) -> None:
        if hasattr(self, "accelerator"):
            self.accelerator.free_memory()
        for name in ("scorer", "model", "optimizer", "scheduler"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


CHECKPOINT_METRICS = ("loss", "accuracy", "margin", "learning_rate")

# --------------------------------------------------------------------------- using a trained reward model


def load_reward_model(base_dir: str | Path, adapter_dir: str | Path, *,
                      parent_adapter_dirs: Sequence[str | Path] = (), dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model job's archive (extracted to ``adapter_dir``) as an eval-mode classifier.

    ``base_dir`` is the job's base model directory; ``parent_adapter_dirs`` the extracted archives of
    the fine-tunes it was chained on, oldest first (empty for a plain base). A LoRA adapter (and its
    head) is merged into the weights; a full archive holds every weight and its tokenizer and is
    loaded as it is (parents ignored). Nothing requires grad.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").exists():
        tokenizer = load_tokenizer(base_dir)
        model = load_sequence_classifier(base_dir, dtype, tokenizer.pad_token_id)
        if parent_adapter_dirs:
            lm = load_causal_lm(Path(base_dir), dtype)
            for parent in parent_adapter_dirs:
                lm = _merge_dir(lm, Path(parent))
            copy_decoder(model, lm)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    else:
        tokenizer = load_tokenizer(adapter_dir)
        model = load_sequence_classifier(adapter_dir, dtype, tokenizer.pad_token_id)
    model.requires_grad_(False).eval().to(device)
    return model, tokenizer


def _merge_dir(lm: PreTrainedModel, directory: Path) -> PreTrainedModel:
    if (directory / "adapter_config.json").exists():
        return PeftModel.from_pretrained(lm, str(directory)).merge_and_unload()  # type: ignore[no-any-return]
    return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
        str(directory), dtype=lm.dtype, trust_remote_code=False, use_safetensors=True, local_files_only=True)


Conversation = str | list[dict[str, Any]]


@torch.no_grad()
def score(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
          prompts_and_responses: Sequence[tuple[Conversation, Conversation]], *, batch_size: int = 8,
          max_length: int = 1024) -> Tensor:
    """Rewards ``[N]`` (fp32, on the CPU) for ``(prompt, response)`` pairs, tokenised as in training.

    A prompt is a user string or a message list; a response an assistant string or message list
    (its last message is what is scored). Long inputs are truncated as training truncates them.
    """
    sequences = [_tokenize_scored(prompt, response, tokenizer, max_length)
                 for prompt, response in prompts_and_responses]
    scorer = SequenceScores(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = D.collate_supervised(sequences[start:start + batch_size], tokenizer.pad_token_id)
        out.append(scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _tokenize_scored(prompt: Conversation, response: Conversation, tokenizer: PreTrainedTokenizerBase,
                     max_length: int) -> D.TokenizedSequence:
    example = {"prompt": prompt, "chosen": response, "rejected": response}
    tokenized = D.tokenize_preference(D.normalize_preference(example), tokenizer, max_length)
    if tokenized is None:
        raise ValueError(f"nothing of the response fits in max_length={max_length}")
    return tokenized.chosen


__all__ = ["RewardModelRecipe", "SequenceScores", "load_reward_model", "pair_loss", "score"]
