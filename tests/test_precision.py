"""fp16 autocast with the loop's loss scaler, on the CPU (``torch.amp.GradScaler`` runs there).

The tiny random Llama's gradients overflow fp16 at scales above 1024 (its RMSNorms see tiny
variances), so the unit tests start the scaler at 1024 (``INIT_SCALE``); the recipe test starts it
at 2**19, where the first steps overflow and are skipped, as a real fp16 run's first steps often are.

* one step in fp16 with the scaler moves the weights as the fp32 step does (SGD, so the update is
  the gradient: an unscaled gradient would be 65536 times too large, a missing scaler would lose
  the small gradients to fp16 underflow);
* a step whose gradients hold an inf is skipped (weights and optimizer state unchanged), the scale
  halves and the schedule still advances;
* the scaler's state survives a checkpoint: a scaler restored from ``training_state.pt`` continues
  exactly like the one that was saved;
* an SFT job forced to fp16 on the CPU runs through the recipe, pauses, resumes and ends with the
  weights of the uninterrupted run, the checkpoint holding the scaler.
"""

from __future__ import annotations

import io
import math
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from service.jobs.spec import FullTraining, LoraTraining, SupervisedHyperparameters
from service.settings import Settings
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS
from workers.archives import final_adapter_key
from workers.base_models import resolve_base_model
from workers.checkpoints import capture_state
from workers.local import MemoryReporter, local_context, method_of
from workers.loop import Optimization, backward, make_accelerator
from workers.modeling import load_causal_lm
from workers.precision import FORCE_ENV, Precision, choose_precision

HP = SupervisedHyperparameters(learning_rate=1.0, lr_scheduler="constant", max_grad_norm=1e9)
SFT_ROWS = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in PREFERENCE_ROWS]


def tiny() -> Path:
    return resolve_base_model("tiny-random-llama", replace(Settings.from_env(MODEL_CACHE.parent),
                                                           model_cache_dir=MODEL_CACHE))


INIT_SCALE = 1024.0


def one_step(mixed: str, *, poison: bool = False, scaler: torch.amp.GradScaler | None = None
             ) -> tuple[nn.Module, Optimization, dict[str, float], dict[str, torch.Tensor]]:
    """One SGD(lr=1) step of the tiny Llama on a fixed batch; returns the model, the optimizer, the
    step's metrics and the weights before."""
    precision = Precision(torch.float32, mixed)  # type: ignore[arg-type]
    accelerator = make_accelerator(HP, precision)
    model = load_causal_lm(tiny())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if scaler is None and mixed == "fp16":
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    optim = Optimization(accelerator, optimizer, scheduler, list(model.parameters()), HP.max_grad_norm, scaler=scaler)
    ids = torch.arange(2, 34).reshape(2, 16)
    loss = prepared(input_ids=ids, labels=ids).loss
    backward(accelerator, loss)
    if poison:
        next(iter(model.parameters())).grad[0, 0] = math.inf  # type: ignore[index]
    metrics = optim.step()
    return model, optim, metrics, before


def updates(model: nn.Module, before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach() - before[k]).flatten() for k, p in model.named_parameters()])


def test_fp16_step_with_the_scaler_updates_like_fp32() -> None:
    fp32_model, _, fp32_metrics, fp32_before = one_step("no")
    fp16_model, optim, fp16_metrics, fp16_before = one_step("fp16")
    assert optim.scaler is not None and fp16_metrics["loss_scale"] == INIT_SCALE
    assert fp16_metrics["skipped_update"] == 0.0
    reference, mixed = updates(fp32_model, fp32_before), updates(fp16_model, fp16_before)
    assert float(reference.norm()) > 0
    # fp16 matmuls round each gradient to ~3 significant digits
    assert float((mixed - reference).norm() / reference.norm()) < 2e-2
    assert fp16_metrics["grad_norm"] == pytest.approx(fp32_metrics["grad_norm"], rel=2e-2)


def test_a_step_with_an_inf_gradient_is_skipped_and_the_scale_halves() -> None:
    model, optim, metrics, before = one_step("fp16", poison=True)
    assert metrics["skipped_update"] == 1.0 and metrics["loss_scale"] == INIT_SCALE
    assert optim.scaler is not None and optim.scaler.get_scale() == INIT_SCALE / 2
    assert float(updates(model, before).abs().max()) == 0.0  # no weight moved
    assert optim.scheduler.scheduler.last_epoch == 1  # the schedule advanced all the same
    assert all(p.grad is None for p in model.parameters())


def test_the_scaler_state_round_trips_a_checkpoint(tmp_path: Path) -> None:
    _, optim, _, _ = one_step("fp16", poison=True)  # scale halved, growth tracker reset
    assert optim.scaler is not None
    state = capture_state(step=1, tokens=0, metrics={}, optimizer=optim.optimizer, scheduler=optim.scheduler,
                          scaler=optim.scaler)
    torch.save(state, tmp_path / "training_state.pt")
    loaded = torch.load(tmp_path / "training_state.pt", weights_only=True)
    restored = torch.amp.GradScaler("cpu", growth_interval=optim.scaler.get_growth_interval())
    restored.load_state_dict(loaded["scaler"])
    fresh = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    # the restored scaler continues where the saved one was; a fresh one would start again
    _, _, after_restore, _ = one_step("fp16", scaler=restored)
    _, _, after_fresh, _ = one_step("fp16", scaler=fresh)
    assert after_restore["loss_scale"] == INIT_SCALE / 2 and after_fresh["loss_scale"] == INIT_SCALE
    assert restored.state_dict() == {**optim.scaler.state_dict(), "_growth_tracker": 1}


def test_precision_for_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_ENV, raising=False)
    assert choose_precision(FullTraining(), "cpu") == Precision(torch.float32, "no")
    assert not choose_precision(FullTraining(), "cpu").needs_scaler
    monkeypatch.setenv(FORCE_ENV, "fp16")  # what a GPU of compute capability < 8 gets
    assert choose_precision(LoraTraining(), "cuda") == Precision(torch.float32, "fp16")
    assert choose_precision(LoraTraining(), "cuda").needs_scaler


# --------------------------------------------------------------------------- through a recipe


STEPS = 8


def sft(tmp: Path, reporter: MemoryReporter, resume_from: tuple[int, str] | None = None) -> Any:
    from workers.recipes.sft import SFTRecipe

    hp = SupervisedHyperparameters(batch_size=2, max_steps=STEPS, n_epochs=8, learning_rate=1e-3,
                                   checkpoint_every_steps=4)
    ctx = local_context(tmp, model="tiny-random-llama", method=method_of("supervised", hp),
                        training_type=FullTraining(), training_rows=SFT_ROWS, seed=3,
                        settings=replace(Settings.from_env(tmp / "data"), model_cache_dir=MODEL_CACHE))
    ctx = replace(ctx, reporter=reporter, resume_from=resume_from)
    recipe = SFTRecipe(ctx)
    recipe.setup()
    try:
        status = recipe.train().status
    finally:
        recipe.cleanup()
    return ctx, status


def final_weights(ctx: Any) -> dict[str, torch.Tensor]:
    data = ctx.store.get_bytes(final_adapter_key(ctx.job_id, attempt=ctx.attempt))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile("model.safetensors")
        assert member is not None
        return load_safetensors(member.read())


def test_fp16_sft_pauses_and_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first steps overflow and halve the scale until it fits; a resume that forgot the scale
    would skip them again and end elsewhere."""
    monkeypatch.setenv(FORCE_ENV, "fp16")
    monkeypatch.setattr("workers.loop.grad_scaler",
                        lambda precision, device: torch.amp.GradScaler(device.type, init_scale=2.0 ** 19))
    straight, status = sft(tmp_path / "a", MemoryReporter())
    assert status == "succeeded"
    scales, skipped = straight.reporter.series("loss_scale"), straight.reporter.series("skipped_update")
    assert scales[0] == 2.0 ** 19 and skipped[0] == 1.0 and 0.0 in skipped
    assert all(b == (a / 2 if s else a) for a, b, s in zip(scales, scales[1:], skipped, strict=False))
    paused, status = sft(tmp_path / "b", MemoryReporter(stop_at={3: "pause"}))
    assert status == "paused"
    (at, _, key), *_ = [c for c in paused.reporter.checkpoints if c[0] == 3]
    with tarfile.open(fileobj=io.BytesIO(paused.store.get_bytes(key)), mode="r:gz") as tar:
        member = tar.extractfile("training_state.pt")
        assert member is not None
        state = torch.load(io.BytesIO(member.read()), weights_only=True)
    next_scale = scales[at - 1] / 2 if skipped[at - 1] else scales[at - 1]
    assert state["scaler"]["scale"] == next_scale < 2.0 ** 19
    resumed, status = sft(tmp_path / "b", MemoryReporter(), resume_from=(at, key))
    assert status == "succeeded"
    assert resumed.reporter.series("loss_scale") == scales[at:]
    ours, theirs = final_weights(resumed), final_weights(straight)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
