"""The retention probe: does the policy still answer what its base answered right?

Preference training can teach a style while quietly breaking facts the base knew. A DPO job whose
hyperparameters name ``retention_file`` (reinforcement-format lines: ``messages`` ending in a user
turn plus the fields its ``retention_grader`` reads) gets ``eval/retention`` at every evaluation:

* once, at the first evaluation, the base (LoRA adapters disabled; a full fine-tune: before the
  first step, when the policy still is the base) answers every probe prompt greedily and the grader
  marks which answers are right;
* at every evaluation the policy answers greedily and is graded the same way;
* ``eval/retention`` = the share of the prompts the base got right that the policy still gets right
  (left out when the base got none right: nothing to retain; metric series hold numbers only), with
  ``eval/retention_base_correct`` and ``eval/retention_policy_correct`` (counts) beside it.

Grading reuses ``service.graders`` (string_check, text_similarity, python in the sandbox, multi);
a reward of at least :data:`PASS_THRESHOLD` counts as right. No database: the runner resolves the
file id to a storage key in ``JobContext.file_keys``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from service.graders import Grader, Sandbox, grade_batch, make_sample, parse_grader
from workers import data as D
from workers.batching import left_pad

#: a grader reward at or above this counts as a right answer (string_check gives 0 or 1)
PASS_THRESHOLD = 0.5
#: prompts generated together
GENERATION_BATCH = 16
#: prompts keep their last this many tokens
PROMPT_TOKENS = 512


def retention_share(base_right: Sequence[bool], policy_right: Sequence[bool]) -> float:
    """The share of the prompts the base got right that the policy still gets right; NaN if none."""
    if len(base_right) != len(policy_right):
        raise ValueError(f"{len(base_right)} base grades but {len(policy_right)} policy grades")
    kept = [p for b, p in zip(base_right, policy_right, strict=True) if b]
    return sum(kept) / len(kept) if kept else math.nan


def greedy_answers(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *,
                   max_new_tokens: int, eos_ids: Sequence[int], device: torch.device) -> list[str]:
    """Greedy answers (eval mode, no gradients), decoded without special tokens, in prompt order."""
    from workers.recipes.rl.sampling import sample_groups

    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompt_ids), GENERATION_BATCH):
                ids, mask = left_pad(prompt_ids[start:start + GENERATION_BATCH], tokenizer.pad_token_id)
                out = sample_groups(model, ids.to(device), mask.to(device), group_size=1,
                                    max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, eos_ids=eos_ids,
                                    pad_token_id=tokenizer.pad_token_id, greedy=True)
                for row, row_mask in zip(out.responses, out.mask, strict=True):
                    kept = row[row_mask].tolist()
                    texts.append(str(tokenizer.decode(kept, skip_special_tokens=True)).strip())
    finally:
        model.train(was_training)
    return texts


@dataclass
class RetentionProbe:
    """The probe of one job: its lines, their prompt ids, the grader, and the base's grades once known."""

    rows: list[dict[str, Any]]
    grader: Grader
    max_new_tokens: int
    sandbox: Sandbox | None = None
    prompt_ids: list[list[int]] = field(default_factory=list)
    base_right: list[bool] | None = None
    base_answers: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, rows: list[dict[str, Any]], grader: Grader | dict[str, Any], tokenizer: Any,
              max_new_tokens: int, sandbox: Sandbox | None = None) -> RetentionProbe:
        probe = cls(rows, parse_grader(grader), max_new_tokens, sandbox)
        probe.prompt_ids = [D.prompt_ids(D.normalize_prompt(row), tokenizer, PROMPT_TOKENS) for row in rows]
        return probe

    def grade(self, answers: Sequence[str]) -> list[bool]:
        results = grade_batch(self.grader, [make_sample(a) for a in answers], self.rows, sandbox=self.sandbox)
        return [r.reward >= PASS_THRESHOLD for r in results]

    def record_base(self, answers: Sequence[str]) -> None:
        self.base_answers = list(answers)
        self.base_right = self.grade(answers)

    def metrics(self, policy_answers: Sequence[str]) -> dict[str, float]:
        """``eval/retention`` and the counts behind it (the base must have been recorded first)."""
        if self.base_right is None:
            raise RuntimeError("the base's answers are graded at the first evaluation, before the policy's")
        policy_right = self.grade(policy_answers)
        share = retention_share(self.base_right, policy_right)
        counts = {"eval/retention_base_correct": float(sum(self.base_right)),
                  "eval/retention_policy_correct": float(sum(policy_right)),
                  "eval/retention_prompts": float(len(policy_right))}
        # a metric series holds numbers only: no share at all when the base knew nothing to retain
        return counts if math.isnan(share) else {"eval/retention": share, **counts}

