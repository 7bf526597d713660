"""Best-checkpoint selection, early stopping and retention (``workers.selection``): the bookkeeping on
hand-made numbers, real DPO runs on tiny-random-llama, and the 400s at job create."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest

from service.jobs.spec import EarlyStopping
from tests.conftest import Api
from tests.test_signals import dpo_recipe
from workers.archives import STATE_FILE
from workers.local import MemoryReporter
from workers.selection import Selection


def test_selection_tracks_the_lowest_loss_patience_and_keeps_three_plus_the_best() -> None:
    sel = Selection("eval/loss", higher_is_better=False, patience=2)
    dropped = []
    for step, loss in ((2, 0.9), (4, 0.5), (6, 0.7), (8, 0.6)):
        assert sel.observe(step, {"eval/loss": loss}) is (step in (2, 4))
        dropped += [s for s, _ in sel.saved(step, f"k{step}")]
    assert sel.best_step == 4 and sel.best_value == 0.5 and sel.stale == 2 and sel.should_stop()
    assert dropped == [2] and [s for s, _ in sel.kept] == [4, 6, 8]  # the last three (4 is also the best)
    sel.observe(10, {"eval/loss": 0.8})
    assert sel.saved(10, "k10") == []  # 4 is out of the last three but the best: kept
    assert [s for s, _ in sel.kept] == [4, 6, 8, 10]
    sel.observe(12, {"eval/loss": 0.4})
    assert [s for s, _ in sel.saved(12, "k12")] == [4, 6]  # a new best: the old one goes
    again = Selection("eval/loss", False, 2)
    again.load_state_dict(sel.state_dict())
    assert (again.best_step, again.best_value, again.stale, again.kept) == (12, 0.4, 0, sel.kept)
    assert not Selection("eval/loss", False).observe(1, {"eval/loss": float("nan")})


def test_a_retention_probe_makes_best_follow_retention_and_ties_go_to_the_lower_loss() -> None:
    from service.jobs.spec import DpoHyperparameters
    from workers.selection import selection_metric

    assert selection_metric(DpoHyperparameters()) == ("eval/loss", False)
    assert selection_metric(DpoHyperparameters(retention_file="file-probe")) == ("eval/retention", True)
    sel = Selection("eval/retention", higher_is_better=True)
    evals = ((2, 1.0, 0.69), (4, 1.0, 0.41), (6, 0.8, 0.20), (8, 1.0, 0.45))
    best = [step for step, retention, loss in evals if sel.observe(step, {"eval/retention": retention,
                                                                            "eval/loss": loss})]
    # 4 ties 2 on retention with a lower loss; 6 lost facts; 8 ties 4 with a higher loss
    assert best == [2, 4] and (sel.best_step, sel.best_value, sel.best_loss) == (4, 1.0, 0.41)


def eval_losses(reporter: MemoryReporter) -> dict[int, float]:
    return {step: values["eval/loss"] for step, values in reporter.metrics if "eval/loss" in values}


def files_of(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile() and not m.name.endswith(STATE_FILE)}


def test_best_selection_takes_the_lowest_eval_loss_checkpoint(tmp_path: Path) -> None:
    reporter = MemoryReporter()
    recipe = dpo_recipe(tmp_path, reporter, learning_rate=2e-1, eval_every_steps=1, checkpoint_selection="best")
    result = recipe.train()
    assert result.status == "succeeded"
    losses = eval_losses(reporter)
    assert sorted(losses) == list(range(1, 9))
    best = min(losses, key=lambda s: losses[s])
    selected = [(m, d) for m, _, d in reporter.events if m.startswith("Selected checkpoint")]
    assert len(selected) == 1 and selected[0][0] == f"Selected checkpoint step {best} by eval/loss={losses[best]:.4f}"
    # the result archive holds the chosen checkpoint's files (without its training state)
    store = recipe.ctx.store
    chosen = selected[0][1]["checkpoint"]
    assert chosen.endswith(f"/step_{best}/adapter.tar.gz")
    store.download_file(chosen, tmp_path / "ckpt.tar.gz")
    store.download_file(result.adapter_key, tmp_path / "final.tar.gz")
    assert files_of(tmp_path / "final.tar.gz") == files_of(tmp_path / "ckpt.tar.gz") != {}
    # retention: the last three checkpoints plus the best, the others' files gone
    steps = [s for s, _, _ in reporter.checkpoints]
    assert steps == sorted({6, 7, 8, best})
    prefix = reporter.checkpoints[0][2].rsplit("/step_", 1)[0]
    for step in range(1, 9):
        assert store.exists(f"{prefix}/step_{step}/adapter.tar.gz") is (step in steps), step
    assert all("eval/loss" in metrics for _, metrics, _ in reporter.checkpoints)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path: Path) -> None:
    reporter = MemoryReporter()
    recipe = dpo_recipe(tmp_path, reporter, learning_rate=2e-1, eval_every_steps=1,
                        early_stopping=EarlyStopping(metric="eval/loss", patience=1))
    result = recipe.train()
    assert result.status == "succeeded"
    losses = eval_losses(reporter)
    # expected: the first evaluation that is not better than the best before it
    best, expected = float("inf"), None
    for step in sorted(losses):
        if losses[step] >= best:
            expected = step
            break
        best = min(best, losses[step])
    assert expected is not None and expected < 8, losses  # the crafted run does stop early
    assert reporter.done == expected and max(losses) == expected and reporter.steps[-1][0] == expected
    assert result.summary["steps"] == expected and reporter.checkpoints[-1][0] == expected
    assert any(m.startswith(f"Early stopping at step {expected}: eval/loss has not improved for 1")
               for m in reporter.messages())


def body(file_id: str, method: str = "dpo", validation: str | None = None, **hyper: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "tiny-random-llama", "training_file": file_id,
                           "method": {"type": method, method: {"hyperparameters": hyper}}}
    if validation:
        out["validation_file"] = validation
    return out


def test_methods_without_an_evaluation_refuse_selection(api: Api, upload) -> None:  # type: ignore[no-untyped-def]
    headers = api.key("acme")
    f = upload(headers)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers,
                        json=body(f["id"], method="ppo", validation=f["id"], checkpoint_selection="best"))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "method.ppo.hyperparameters.checkpoint_selection"
    assert "ppo" in r.json()["error"]["message"]


@pytest.mark.parametrize(("hyper", "with_validation", "param"), [
    ({"checkpoint_selection": "best"}, False, "method.dpo.hyperparameters.checkpoint_selection"),
    ({"early_stopping": {"patience": 2}}, False, "method.dpo.hyperparameters.early_stopping"),
    ({"early_stopping": {"metric": "eval/acc", "patience": 2}}, True,
     "method.dpo.hyperparameters.early_stopping.metric"),
    ({"early_stopping": {"patience": 0}}, True, "method.dpo.hyperparameters.early_stopping.patience"),
    ({"checkpoint_selection": "worst"}, True, "method.dpo.hyperparameters.checkpoint_selection"),
])
def test_selection_and_early_stopping_are_validated_at_create(api: Api, upload, hyper: dict[str, Any],  # type: ignore[no-untyped-def]
                                                              with_validation: bool, param: str) -> None:
    headers = api.key("acme")
    f = upload(headers)
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers,
                        json=body(f["id"], validation=f["id"] if with_validation else None, **hyper))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = api.client.post("/v1/fine_tuning/jobs", headers=headers, json=body(
        f["id"], validation=f["id"], checkpoint_selection="best", early_stopping={"patience": 2}))
    assert ok.status_code == 200, ok.text
