"""The DPO recipe: its batching and metrics on known numbers, precomputed reference log-probs, the loss
variants through a real worker, and (slow) a real preference learned by SmolLM2-135M-Instruct.

Jobs run in one worker process (the module-scoped ``live`` fixture) on tiny-random-llama, except the
slow test. At step 1 the LoRA update is zero, so policy == reference and every loss has a value we
can write down: sigmoid ln 2, IPO ``(0 - 1/(2 beta))**2``, hinge ``relu(1 - 0) = 1``, robust
``((1-ls) ln 2 - ls ln 2) / (1 - 2 ls) = ln 2``, RPO ``ln 2 + w * nll``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from service.jobs.spec import DpoHyperparameters, LoraTraining
from service.settings import Settings
from service.storage import LocalStore
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, LiveService
from workers.local import local_context, method_of
from workers.losses import DPOLossOutput, dpo_metrics

LN2 = math.log(2)
TINY = "tiny-random-llama"


# --------------------------------------------------------------------------- in-process helpers


def recipe_for(tmp_path: Path, job_id: str = "ftjob-test", **hyperparameters: Any) -> Any:
    """A DPO recipe on tiny-random-llama over a local store in ``tmp_path``, set up, not trained."""
    from workers.recipes.dpo import DPORecipe

    hp = DpoHyperparameters(**{"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, **hyperparameters})
    ctx = local_context(tmp_path, model=TINY, method=method_of("dpo", hp), job_id=job_id,
                        training_type=LoraTraining(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=3,
                        training_rows=PREFERENCE_ROWS, validation_rows=PREFERENCE_ROWS[:5],
                        settings=replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE),
                        store=LocalStore(tmp_path / "objects"))
    recipe = DPORecipe(ctx)
    recipe.setup()
    return recipe


def randomise_lora(recipe: Any) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in recipe.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# --------------------------------------------------------------------------- known answers, in process


def test_shared_prompt_layout_gives_the_plain_layouts_log_probs(tmp_path: Path) -> None:
    """One row per pair (prompt once) == the padded [chosen..., rejected...] batch, with LoRA non-zero."""
    from workers.pairs import collate_plain, collate_shared

    recipe = recipe_for(tmp_path)
    assert recipe.shared_layout
    randomise_lora(recipe)
    pairs = recipe.pairs[:6]
    shared_batch = collate_shared(pairs, recipe.tokenizer.pad_token_id)
    plain_batch = collate_plain(pairs, recipe.tokenizer.pad_token_id)
    # The prompt is stored once: fewer token slots than the padded layout.
    assert shared_batch.input_ids.numel() < plain_batch.input_ids.numel()
    with torch.no_grad():
        shared, shared_counts = recipe.policy(shared_batch)
        plain, plain_counts = recipe.policy(plain_batch)
    assert shared_counts.tolist() == plain_counts.tolist() == [
        sum(p.chosen.loss_mask) for p in pairs] + [sum(p.rejected.loss_mask) for p in pairs]
    assert torch.allclose(shared, plain, atol=1e-4, rtol=0)
    assert float((shared - plain).abs().max()) < 1e-4 and float(shared.abs().min()) > 1.0


def test_shared_prompt_layout_when_the_completions_share_their_first_tokens(tmp_path: Path) -> None:
    """The common prefix may run into the completions; their shared tokens still count on both sides."""
    from workers import data as D
    from workers.pairs import collate_plain, collate_shared

    recipe = recipe_for(tmp_path)
    randomise_lora(recipe)
    rows = [{"prompt": "Name a colour.", "chosen": "The colour red.", "rejected": "The colour of the sky."},
            {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"},  # identical sides
            PREFERENCE_ROWS[0]]
    pairs = [D.tokenize_preference(D.normalize_preference(r), recipe.tokenizer, 64) for r in rows]
    with torch.no_grad():
        shared, _ = recipe.policy(collate_shared(pairs, recipe.tokenizer.pad_token_id))
        plain, _ = recipe.policy(collate_plain(pairs, recipe.tokenizer.pad_token_id))
    assert float((shared - plain).abs().max()) < 1e-4
    assert float(shared[1]) == pytest.approx(float(shared[4]), abs=1e-5)  # identical sides


def test_reference_pass_builds_no_autograd_graph(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path)
    batch = recipe._collate(recipe.pairs[:4])
    ref, _ = recipe._reference_logps(batch)
    assert not ref.requires_grad and ref.grad_fn is None
    for training in (True, False):  # the pass runs in eval mode and gives the policy its mode back
        recipe.policy.train(training)
        recipe._reference_logps(batch)
        assert recipe.policy.training is training


def test_step_metrics_are_dpo_metrics_converted_once() -> None:
    """The recipe keeps metrics on the device and converts once a step; same numbers as ``dpo_metrics``."""
    from workers.recipes.dpo import _Tally

    generator = torch.Generator().manual_seed(0)
    tally, chosen_all, rejected_all, lc_all, lr_all = _Tally(), [], [], [], []
    for size, weight in ((4, 0.5), (3, 0.3), (2, 0.2)):  # unequal micro-batches
        chosen, rejected = torch.randn(size, generator=generator), torch.randn(size, generator=generator)
        lc, lr = torch.randn(size, generator=generator) - 20, torch.randn(size, generator=generator) - 30
        counts = torch.full((size,), 10)
        # chosen 0.5 nats (0.05 per token) below the reference: every pair displaced; rejected unchanged
        tally.add({"chosen_rewards": chosen, "rejected_rewards": rejected, "logps_chosen": lc,
                   "logps_rejected": lr, "ref_chosen": lc + 0.5, "ref_rejected": lr, "counts_chosen": counts,
                   "counts_rejected": counts, "loss": torch.tensor(float(size))}, weight)
        chosen_all.append(chosen), rejected_all.append(rejected), lc_all.append(lc), lr_all.append(lr)
    values = tally.values()
    cat = torch.cat
    expected = dpo_metrics(DPOLossOutput(torch.zeros(9), cat(chosen_all), cat(rejected_all)), cat(lc_all),
                           cat(lr_all))
    assert values == pytest.approx({**expected, "loss": 4 * 0.5 + 3 * 0.3 + 2 * 0.2, "signals/displacement": 1.0,
                                    "logps/chosen_drift": -0.05, "logps/rejected_drift": 0.0}, abs=1e-6)


def test_precomputed_reference_is_stored_by_pair_and_reused(tmp_path: Path) -> None:
    """A second run of the same job loads the stored log-probs (no reference forward) and trains the same."""
    from safetensors.torch import load

    from workers.recipes.dpo import ref_logps_key

    first = recipe_for(tmp_path, precompute_ref_log_probs=True)
    assert first.train().status == "succeeded"
    stored = load(first.ctx.store.get_bytes(ref_logps_key("ftjob-test")))
    assert stored["train"].shape == (len(PREFERENCE_ROWS), 2) and stored["validation"].shape == (5, 2)
    # Pair i's row is the reference log-probs of pair i, chosen then rejected.
    with torch.no_grad():
        live_ref, _ = first._reference_logps(first._collate(first.pairs[5:6]))
    assert stored["train"][5].tolist() == pytest.approx(live_ref.tolist(), abs=1e-4)
    assert any(m.startswith("Precomputed reference log-probs") and d and d["seconds"] >= 0
               for m, _, d in first.ctx.reporter.events)

    second = recipe_for(tmp_path, precompute_ref_log_probs=True)
    calls = 0
    original = second._reference_logps

    def counting(batch: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(batch)

    second._reference_logps = counting
    assert second.train().status == "succeeded"
    assert calls == 0
    events = second.ctx.reporter.messages()
    assert any(m.startswith("Reusing the precomputed reference log-probs") for m in events)
    losses = [r.ctx.reporter.series("loss") for r in (first, second)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0][0] == pytest.approx(LN2, abs=1e-6)


# --------------------------------------------------------------------------- through the worker


def dpo_job(training_file: str, validation_file: str | None = None, model: str = TINY,
            training_type: dict[str, Any] | None = None, **hyperparameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "training_file": training_file, "seed": 11,
                            "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}}
    if validation_file:
        body["validation_file"] = validation_file
    if training_type:
        body["training_type"] = training_type
    return body


@pytest.fixture(scope="module")
def files(live: LiveService) -> dict[str, str]:
    return {"train": live.upload(PREFERENCE_ROWS, "train.jsonl")["id"],
            "val": live.upload(PREFERENCE_ROWS[:6], "val.jsonl")["id"]}


def test_precomputed_reference_gives_the_live_reference_loss_curve(live: LiveService,
                                                                   files: dict[str, str]) -> None:
    hp = {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-3}
    plain = live.run(dpo_job(files["train"], files["val"], **hp))
    pre = live.run(dpo_job(files["train"], files["val"], precompute_ref_log_probs=True, **hp))
    assert plain["status"] == pre["status"] == "succeeded", (plain["error"], pre["error"])
    curves = [live.metric(job["id"], "loss") for job in (plain, pre)]
    assert len(curves[0]) == len(curves[1]) == 3
    assert curves[0][0] == pytest.approx(LN2, abs=1e-5) and curves[1][0] == pytest.approx(LN2, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(*curves, strict=True)) <= 1e-4
    assert curves[1][-1] < curves[1][0]  # it trains
    evals = [live.metric(job["id"], "eval/loss") for job in (plain, pre)]
    assert evals[0] and evals[0] == pytest.approx(evals[1], abs=1e-4)
    store = live.api.state.store
    assert store.exists(f"jobs/{pre['id']}/ref_logps.safetensors")
    assert not store.exists(f"jobs/{plain['id']}/ref_logps.safetensors")
    events = live.get(f"/v1/fine_tuning/jobs/{pre['id']}/events?order=asc&limit=100").json()["data"]
    timed = [e for e in events if e["message"].startswith("Precomputed reference log-probs")]
    assert len(timed) == 1 and timed[0]["data"]["seconds"] >= 0 and timed[0]["data"]["train"] == 16


@pytest.mark.parametrize(("hyperparameters", "expected"), [
    ({"loss_type": "ipo", "beta": 0.1}, (0 - 1 / (2 * 0.1)) ** 2),   # 25
    ({"loss_type": "hinge", "beta": 0.1}, 1.0),                      # relu(1 - 0)
    ({"loss_type": "robust", "label_smoothing": 0.1}, LN2),          # (0.9 ln2 - 0.1 ln2) / 0.8
], ids=["ipo", "hinge", "robust"])
def test_loss_variants_log_their_known_step_one_loss(
        live: LiveService, files: dict[str, str], hyperparameters: dict[str, Any], expected: float) -> None:
    job = live.run(dpo_job(files["train"], batch_size=8, max_steps=2, learning_rate=1e-3, **hyperparameters))
    assert job["status"] == "succeeded", job["error"]
    losses = live.metric(job["id"], "loss")
    assert len(losses) == 2
    assert losses[0] == pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_rpo_adds_the_weighted_chosen_nll(live: LiveService, files: dict[str, str]) -> None:
    job = live.run(dpo_job(files["train"], batch_size=8, max_steps=2, learning_rate=1e-3, sft_weight=0.5))
    assert job["status"] == "succeeded", job["error"]
    losses, nll = live.metric(job["id"], "loss"), live.metric(job["id"], "nll_loss")
    assert len(losses) == len(nll) == 2
    assert nll[0] > 0 and losses[0] > LN2
    assert losses[0] == pytest.approx(LN2 + 0.5 * nll[0], abs=1e-5)


# --------------------------------------------------------------------------- a real preference (slow)
