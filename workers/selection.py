"""Best-checkpoint selection, early stopping and checkpoint retention, as loop state.

``checkpoint_selection: "best"`` makes the loop checkpoint at every evaluation and, at the end, take the
result from the checkpoint whose evaluation metric was best; ``early_stopping`` ends a job whose metric
has not improved for ``patience`` evaluations (the job succeeds). Which metric, and which direction is
better, is decided in one place, :func:`selection_metric`.

Retention (every job): the last ``KEEP_LAST`` checkpoints stay downloadable, plus the best one; older
checkpoints are deleted (their database row first, through the reporter, then the stored files), as
OpenAI keeps the last three. The state here rides in every checkpoint's training state, so a resumed
job keeps its best, its patience count and the list of checkpoints it may still delete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from service.jobs.spec import CommonHyperparameters

KEEP_LAST = 3
#: selection metrics for which a larger value is the better checkpoint
HIGHER_IS_BETTER = ("eval/retention",)


def selection_metric(hp: CommonHyperparameters) -> tuple[str, bool]:
    """(metric name, higher is better) that ``best`` and early stopping follow.

    ``eval/retention`` (higher is better) once a job names a retention probe: the point of ``best`` is
    the checkpoint that learned the preference without losing what the base knew, and eval loss keeps
    falling while facts go. Otherwise ``eval/loss``. An ``early_stopping.metric`` overrides both."""
    if hp.early_stopping is not None:
        return hp.early_stopping.metric, hp.early_stopping.metric in HIGHER_IS_BETTER
    if getattr(hp, "retention_file", None):
        return "eval/retention", True
    return "eval/loss", False


@dataclass
class Selection:
    metric: str
    higher_is_better: bool
    patience: int | None = None  # early stopping's, None without it
    best_step: int | None = None
    best_value: float = math.nan
    best_loss: float = math.nan  # the best checkpoint's eval loss, for ties (``better``)
    stale: int = 0  # evaluations since the last improvement
    #: (step, storage key) of the checkpoints written so far and not deleted, oldest first
    kept: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def of(cls, hp: CommonHyperparameters) -> Selection:
        metric, higher = selection_metric(hp)
        patience = hp.early_stopping.patience if hp.early_stopping is not None else None
        return cls(metric, higher, patience)

    def better(self, value: float, loss: float = math.nan) -> bool:
        """Strictly better; a tie on a coarse metric (retention is a share of a few prompts, often 1.0 at
        every eval) goes to the lower eval loss, so ``best`` is not stuck at the least-trained checkpoint."""
        if not math.isfinite(value):
            return False
        if self.best_step is None:
            return True
        if value == self.best_value and self.metric != "eval/loss":
            return math.isfinite(loss) and (not math.isfinite(self.best_loss) or loss < self.best_loss)
        return value > self.best_value if self.higher_is_better else value < self.best_value

    def observe(self, step: int, metrics: Any) -> bool:
        """An evaluation's result; True when it is the best so far."""
        value = float(metrics.get(self.metric, math.nan)) if isinstance(metrics, dict) else math.nan
        loss = float(metrics.get("eval/loss", math.nan)) if isinstance(metrics, dict) else math.nan
        if self.better(value, loss):
            self.best_step, self.best_value, self.best_loss, self.stale = step, value, loss, 0
            return True
        self.stale += 1
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def saved(self, step: int, key: str) -> list[tuple[int, str]]:
        """Record a checkpoint; returns the ones to delete now (beyond the last ``KEEP_LAST``, not the best)."""
        self.kept = [(s, k) for s, k in self.kept if k != key] + [(step, key)]
        recent = {k for _, k in self.kept[-KEEP_LAST:]}
        drop = [(s, k) for s, k in self.kept if k not in recent and s != self.best_step]
        self.kept = [entry for entry in self.kept if entry not in drop]
        return drop

    def key_of(self, step: int) -> str | None:
        return next((k for s, k in reversed(self.kept) if s == step), None)

    def state_dict(self) -> dict[str, Any]:
        return {"best_step": -1 if self.best_step is None else self.best_step, "best_value": self.best_value,
                "best_loss": self.best_loss,
                "stale": self.stale, "kept_steps": [s for s, _ in self.kept], "kept_keys": [k for _, k in self.kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = int(state.get("best_step", -1))
        self.best_step = None if best < 0 else best
        self.best_value = float(state.get("best_value", math.nan))
        self.best_loss = float(state.get("best_loss", math.nan))
        self.stale = int(state.get("stale", 0))
        self.kept = list(zip((int(s) for s in state.get("kept_steps", [])), state.get("kept_keys", []), strict=True))
