"""Over-optimization signals of preference training (DPO family, reward model): pure math and a monitor.

DPO can lower the likelihood of the chosen completions while the margin grows ("likelihood
displacement", Razin et al. 2024), and it "directly minimizes the log-likelihood of rejected
responses", so a policy can look better and better on the preference loss while generating worse.
These signals make that visible per step; docs/overoptimization.md explains each one and its threshold.

- ``signals/displacement``: share of the step's pairs whose chosen log-prob (summed over completion
  tokens) fell below the reference's by more than ``DISPLACEMENT_TOLERANCE`` nats per token (so the
  exact ties of step 1, policy == reference, never count).
- ``logps/chosen_drift`` / ``logps/rejected_drift``: mean over pairs of the *per-token* policy minus
  reference log-prob of the chosen / rejected completion (per token, so the thresholds do not depend
  on completion length).
- ``signals/margin_growth``: least-squares slope, per step, of ``rewards/margins`` over the last
  ``WINDOW`` steps.
- ``signals/accuracy_gap``: train preference accuracy (mean over the last ``WINDOW`` steps) minus
  eval accuracy, at each evaluation.

:class:`OverOptimization` keeps the windows and warns once per signal per job; it is recipe state
(``workers.loop.Stateful``), saved with every checkpoint, so a resumed job neither warns again nor
forgets its window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

#: nats per token a chosen completion must lose against the reference to count as displaced
DISPLACEMENT_TOLERANCE = 0.01
#: steps averaged (or fitted) before a noisy per-step signal is compared with its threshold
WINDOW = 5


@dataclass(frozen=True)
class Signal:
    metric: str
    threshold: float
    above: bool  # True: warns when the value exceeds the threshold; False: when it falls below it
    meaning: str
    advice: str

    def crossed(self, value: float) -> bool:
        return math.isfinite(value) and (value > self.threshold if self.above else value < self.threshold)


_ADVICE = ("try a lower learning_rate, a higher beta, sft_weight > 0 (RPO: an NLL term on the chosen "
           "completions) or fewer n_epochs")
SIGNALS: dict[str, Signal] = {s.metric: s for s in (
    Signal("signals/displacement", 0.6, True,
           "most chosen completions became less likely than under the reference (likelihood displacement): "
           "the margin grows by pushing both sides down", _ADVICE),
    Signal("logps/chosen_drift", -0.5, False,
           "the chosen completions lost more than 0.5 nats per token against the reference", _ADVICE),
    Signal("logps/rejected_drift", -2.0, False,
           "the rejected completions lost more than 2 nats per token against the reference: DPO is "
           "mostly minimising their likelihood, which can degrade generation", _ADVICE),
    Signal("signals/margin_growth", 0.5, True,
           "the reward margin grows by more than 0.5 per step: the policy is fitting the pairs fast, "
           "often memorising them", _ADVICE),
    Signal("signals/accuracy_gap", 0.2, True,
           "train preference accuracy exceeds eval accuracy by more than 0.2: the policy overfits the "
           "training pairs", "try fewer n_epochs, a lower learning_rate or a higher beta"),
)}


# --------------------------------------------------------------------------- pure functions


def displacement_share(policy_chosen: Tensor, ref_chosen: Tensor, counts: Tensor,
                       tolerance: float = DISPLACEMENT_TOLERANCE) -> Tensor:
    """Share of pairs with ``policy - ref < -tolerance * tokens`` (sums over completion tokens)."""
    drop = policy_chosen.float() - ref_chosen.float()
    return (drop < -tolerance * counts.float().clamp(min=1)).float().mean()


def per_token_drift(policy: Tensor, ref: Tensor, counts: Tensor) -> Tensor:
    """Mean over pairs of ``(policy - ref) / tokens``: the per-token log-prob change of one side."""
    return ((policy.float() - ref.float()) / counts.float().clamp(min=1)).mean()


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (NaN with fewer than two)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def accuracy_gap(train_accuracies: Sequence[float], eval_accuracy: float) -> float:
    """Mean of the recent train accuracies minus the eval accuracy (NaN without either)."""
    finite = [a for a in train_accuracies if math.isfinite(a)]
    if not finite or not math.isfinite(eval_accuracy):
        return math.nan
    return sum(finite) / len(finite) - eval_accuracy


def pair_signals(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 chosen_counts: Tensor, rejected_counts: Tensor) -> dict[str, Tensor]:
    """The per-step signals of one set of pairs, on the device (converted with the step's metrics)."""
    return {
        "signals/displacement": displacement_share(policy_chosen, ref_chosen, chosen_counts),
        "logps/chosen_drift": per_token_drift(policy_chosen, ref_chosen, chosen_counts),
        "logps/rejected_drift": per_token_drift(policy_rejected, ref_rejected, rejected_counts),
    }


# --------------------------------------------------------------------------- the monitor


Warn = Callable[[str, dict[str, Any]], None]


class OverOptimization:
    """Windows of the noisy per-step signals and the signals already warned about.

    ``margin`` / ``accuracy``: the recipe's metric names of the reward margin and the preference
    accuracy (DPO: ``rewards/margins``, ``rewards/accuracies``; reward model: ``margin``, ``accuracy``).
    ``warn(message, data)`` emits the job event (the recipe passes its reporter's ``event``)."""

    windowed = ("signals/displacement", "logps/chosen_drift", "logps/rejected_drift")

    def __init__(self, warn: Warn, *, margin: str = "rewards/margins", accuracy: str = "rewards/accuracies",
                 window: int = WINDOW) -> None:
        self.warn = warn
        self.margin, self.accuracy, self.window = margin, accuracy, window
        self.history: dict[str, list[float]] = {}
        self.warned: list[str] = []
        self.step = 0

    def _push(self, name: str, value: float) -> list[float]:
        values = self.history.setdefault(name, [])
        values.append(float(value))
        del values[:-self.window]
        return values

    def _check(self, metric: str, value: float, step: int) -> None:
        signal = SIGNALS[metric]
        if metric in self.warned or not signal.crossed(value):
            return
        self.warned.append(metric)
        relation = ">" if signal.above else "<"
        self.warn(f"Over-optimization: {metric}={value:.3f} {relation} {signal.threshold} at step {step}: "
                  f"{signal.meaning}; {signal.advice}",
                  {"signal": metric, "value": value, "threshold": signal.threshold, "step": step})

    def after_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add ``signals/margin_growth`` to a step's metrics and warn on any full window crossing a
        threshold (the window's mean; margin growth: the window's slope)."""
        self.step += 1
        for name in (*self.windowed, self.accuracy):
            if name in metrics and math.isfinite(metrics[name]):
                values = self._push(name, metrics[name])
                if name in self.windowed and len(values) == self.window:
                    self._check(name, sum(values) / len(values), self.step)
        if self.margin in metrics and math.isfinite(metrics[self.margin]):
            margins = self._push("margin", metrics[self.margin])
            if len(margins) >= 2:
                metrics["signals/margin_growth"] = slope(margins)
            if len(margins) == self.window:
                self._check("signals/margin_growth", metrics["signals/margin_growth"], self.step)
        return metrics

    def after_eval(self, step: int, eval_accuracy: float) -> dict[str, float]:
        """``signals/accuracy_gap`` at an evaluation (empty before any step), warned on at once:
        the train side is already a window mean."""
        gap = accuracy_gap(self.history.get(self.accuracy, []), eval_accuracy)
        if not math.isfinite(gap):
            return {}
        self._check("signals/accuracy_gap", gap, step)
        return {"signals/accuracy_gap": gap}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "warned": list(self.warned),
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: [float(x) for x in v] for k, v in (state.get("history") or {}).items()}
        self.warned = list(state.get("warned") or [])
        self.step = int(state.get("step") or 0)
