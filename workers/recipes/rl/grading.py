"""Rewards from graders (OpenAI's grader objects, ``service.graders``): a reward that is not a model.

:class:`GraderScorer` grades a batch of completions against their dataset lines with
``service.graders.grade_batch`` (python graders in the bubblewrap sandbox, model graders on a local
model), each sample within the per-sample timeout and the whole batch within the batch timeout. A
grader error scores that sample 0 and is counted (``grader/errors``, and one event per step that had
any, naming the flags); it never fails the step. :meth:`GraderScorer.submit` starts grading on a
thread so the engine can sample the next chunk meanwhile.

:class:`GraderReward` makes a scorer the reward of the PPO engine (``algorithm: ppo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from service.graders import Grader, GradeResult, Sandbox, error_summary, grade_batch, make_sample
from service.graders.model_graders import ModelRunner
from workers.recipes.rl.engine import Prompt, Rollout


@dataclass
class Grades:
    rewards: Tensor                          # [N] fp32, 0 where the grader failed
    per_grader: dict[str, list[float]]       # a multi's sub-graders by name, and the grader itself
    results: list[GradeResult]

    @property
    def errors(self) -> dict[str, Any] | None:
        return error_summary(self.results)


@dataclass
class GraderScorer:
    grader: Grader
    sandbox: Sandbox
    per_sample_timeout: float
    batch_timeout: float | None = None
    model_runner: ModelRunner | None = None
    max_workers: int = 8
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="alignd-grading"))

    @property
    def name(self) -> str:
        return self.grader.display_name

    def grade(self, prompts: Sequence[Prompt], texts: Sequence[str], finished: Sequence[bool]) -> Grades:
        samples = [make_sample(text, finish_reason="stop" if done else "length")
                   for text, done in zip(texts, finished, strict=True)]
        results = grade_batch(self.grader, samples, [p.item for p in prompts],
                              per_sample_timeout=self.per_sample_timeout,
                              batch_timeout=self.batch_timeout, max_workers=self.max_workers,
                              model_runner=self.model_runner, sandbox=self.sandbox)
        per_grader: dict[str, list[float]] = {self.name: [r.reward for r in results]}
        for result in results:
            for sub, value in result.sub_rewards.items():
                if isinstance(value, int | float):
                    per_grader.setdefault(sub, []).append(float(value))
        return Grades(torch.tensor([r.reward for r in results], dtype=torch.float32), per_grader, results)

    def submit(self, prompts: Sequence[Prompt], texts: Sequence[str], finished: Sequence[bool]) -> Future[Grades]:
        """Grade on a background thread (the caller samples meanwhile); ``.result()`` collects."""
        return self._pool.submit(self.grade, list(prompts), list(texts), list(finished))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def merge(parts: Sequence[Grades]) -> Grades:
    per_grader: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.per_grader.items():
            per_grader.setdefault(name, []).extend(values)
    return Grades(torch.cat([p.rewards for p in parts]) if parts else torch.zeros(0), per_grader,
                  [r for p in parts for r in p.results])


def grade_metrics(grades: Grades, prefix: str = "") -> dict[str, float]:
    """TRL's ``rewards/<name>/mean`` and ``/std`` per grader, and ``grader/errors`` (samples that failed)."""
    out: dict[str, float] = {}
    for name, values in grades.per_grader.items():
        t = torch.tensor(values, dtype=torch.float32)
        out[f"{prefix}rewards/{name}/mean"] = float(t.mean()) if len(values) else 0.0
        out[f"{prefix}rewards/{name}/std"] = float(t.std()) if len(values) > 1 else 0.0
    summary = grades.errors
    out[f"{prefix}grader/errors"] = float(summary["failed"]) if summary else 0.0
    return out


@dataclass
class GraderReward:
    """The PPO engine's ``Reward`` from a grader: responses are decoded and graded against their lines."""

    scorer: GraderScorer
    tokenizer: PreTrainedTokenizerBase
    last: list[Grades] = field(default_factory=list)

    def __call__(self, r: Rollout, rows: slice) -> Tensor:
        lengths = r.mask[rows].sum(dim=1).tolist()
        texts = [str(self.tokenizer.decode(response[:n].tolist(), skip_special_tokens=True))
                 for response, n in zip(r.responses[rows], lengths, strict=True)]
        grades = self.scorer.grade(r.prompts[rows], texts, r.has_eos[rows].tolist())
        self.last.append(grades)
        return grades.rewards
