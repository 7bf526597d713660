"""One way to build a model: precision, LoRA settings and their errors, the same for every method.

* full fine-tunes keep fp32 master weights under bf16 autocast: a full-FT step on the CPU with bf16
  autocast updates the weights like an fp32 step, where bf16 weights would round small updates away;
* no weight decay on norms and biases;
* the full-FT DPO reference runs under the policy's autocast, so step 1 is exactly ln 2 in bf16 too;
* ``lora_dropout`` reaches the saved ``adapter_config.json`` of SFT, DPO and reward-model jobs (PPO's
  is checked in ``test_rl_engine.py``), and a target module the model lacks is the same
  ``invalid_training_type`` error for every method.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from service.jobs.spec import (
    DpoHyperparameters,
    FullTraining,
    LoraTraining,
    PpoHyperparameters,
    RewardModelHyperparameters,
    SupervisedHyperparameters,
    TrainingType,
)
from service.settings import Settings
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS
from workers.archives import final_adapter_key
from workers.context import JobFailure, ModelRef
from workers.local import local_context, method_of
from workers.loop import make_optimizer
from workers.modeling import choose_precision

TINY = "tiny-random-llama"
SFT_ROWS = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in PREFERENCE_ROWS]
RECIPES = {
    "supervised": ("workers.recipes.sft", "SFTRecipe", SupervisedHyperparameters, SFT_ROWS),
    "dpo": ("workers.recipes.dpo", "DPORecipe", DpoHyperparameters, PREFERENCE_ROWS),
    "reward_model": ("workers.recipes.reward_model", "RewardModelRecipe", RewardModelHyperparameters,
                     PREFERENCE_ROWS),
}


def run(tmp: Path, kind: str, training_type: TrainingType, *, setup_only: bool = False, **hp: Any) -> Any:
    import importlib

    module, name, hp_type, rows = RECIPES[kind]
    hyperparameters = hp_type(**{"batch_size": 4, "max_steps": 1, "learning_rate": 1e-5, **hp})
    ctx = local_context(tmp, model=TINY, method=method_of(kind, hyperparameters), training_type=training_type,
                        training_rows=rows, seed=4,
                        settings=replace(Settings.from_env(tmp / "data"), model_cache_dir=MODEL_CACHE))
    recipe = getattr(importlib.import_module(module), name)(ctx)
    recipe.setup()
    if setup_only:
        return recipe
    try:
        assert recipe.train().status == "succeeded"
    finally:
        recipe.cleanup()
    return ctx


def final_files(ctx: Any, tmp: Path) -> Path:
    archive = tmp / "final.tar.gz"
    ctx.store.download_file(final_adapter_key(ctx.job_id, attempt=ctx.attempt), archive)
    out = tmp / "final"
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(out, filter="data")
    return out


# --------------------------------------------------------------------------- precision


def test_precision_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGND_MIXED_PRECISION", raising=False)
    assert choose_precision(LoraTraining(), "cpu") == choose_precision(FullTraining(), "cpu")
    assert choose_precision(FullTraining(), "cpu").weights == torch.float32
    assert choose_precision(FullTraining(), "cpu").mixed == "no"
    monkeypatch.setenv("ALIGND_MIXED_PRECISION", "bf16")  # what a bf16 GPU gets
    full, lora = choose_precision(FullTraining(), "cuda"), choose_precision(LoraTraining(), "cuda")
    assert (full.weights, full.mixed) == (torch.float32, "bf16")  # fp32 master weights
    assert (lora.weights, lora.mixed) == (torch.bfloat16, "bf16")  # a frozen base may be bf16
    monkeypatch.setenv("ALIGND_MIXED_PRECISION", "fp16")  # an older GPU: fp16 autocast + loss scaler
    assert choose_precision(LoraTraining(), "cuda").weights == torch.float32


def base_weights() -> dict[str, torch.Tensor]:
    return load_file(str(next((MODEL_CACHE / TINY).glob("*.safetensors"))))


def test_full_fine_tune_under_bf16_autocast_updates_like_fp32(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """lr 1e-5 on weights of ~0.02: Adam's first step moves each weight by about 1e-5, below half a
    bf16 ulp at that size (~6e-5), so bf16 weights would not move at all."""
    monkeypatch.delenv("ALIGND_MIXED_PRECISION", raising=False)
    before = base_weights()
    fp32 = load_file(str(final_files(run(tmp_path / "fp32", "supervised", FullTraining()), tmp_path / "a")
                         / "model.safetensors"))
    monkeypatch.setenv("ALIGND_MIXED_PRECISION", "bf16")
    mixed = load_file(str(final_files(run(tmp_path / "bf16", "supervised", FullTraining()), tmp_path / "b")
                          / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert mixed[name].dtype == torch.float32
    update_fp32, update_mixed = fp32[name] - before[name], mixed[name] - before[name]
    assert float(update_fp32.abs().mean()) == pytest.approx(1e-5, rel=0.2)
    # bf16 matmuls change the gradients' low bits; Adam's first step is about +-lr a weight whatever the
    # gradient's size, so the two updates agree but for the few weights whose gradient is near zero
    assert float((update_mixed - update_fp32).norm() / update_fp32.norm()) < 0.15
    assert float(((update_mixed - update_fp32).abs() < 1e-6).float().mean()) > 0.95
    # what bf16 weights make of the same update: it rounds away
    rounded = (before[name].bfloat16() + update_fp32.bfloat16()).float() - before[name].bfloat16().float()
    assert float(rounded.norm() / update_fp32.norm()) < 0.5


def test_no_weight_decay_on_norms_and_biases() -> None:
    matrix, bias, norm = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    hp = SupervisedHyperparameters(learning_rate=0.1, weight_decay=0.5, lr_scheduler="constant")
    optimizer, _ = make_optimizer([matrix, bias, norm], hp, total_updates=1)
    for p in (matrix, bias, norm):
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(matrix.detach(), torch.full((2, 2), 1 - 0.1 * 0.5))  # decoupled decay: w *= 1 - lr*wd
    assert torch.equal(bias.detach(), torch.ones(2)) and torch.equal(norm.detach(), torch.ones(2))


def test_full_dpo_reference_shares_the_policys_autocast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At step 1 the policy is the reference: under one autocast their log-probs agree and the loss is ln 2."""
    monkeypatch.setenv("ALIGND_MIXED_PRECISION", "bf16")
    ctx = run(tmp_path, "dpo", FullTraining())
    (_, first), = ctx.reporter.steps
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- LoRA settings


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_lora_dropout_is_saved_in_the_adapter_config(tmp_path: Path, kind: str) -> None:
    lora = LoraTraining(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "v_proj"])
    config = json.loads((final_files(run(tmp_path, kind, lora), tmp_path) / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.3 and config["r"] == 4 and sorted(config["target_modules"]) == [
        "q_proj", "v_proj"]


@pytest.mark.parametrize("kind", [*sorted(RECIPES), "ppo"])
def test_a_missing_target_module_is_the_same_error_for_every_method(tmp_path: Path, kind: str) -> None:
    lora = LoraTraining(target_modules=["q_proj", "query_key_value"])
    with pytest.raises(JobFailure) as failure:
        if kind == "ppo":
            from workers.recipes.rl.ppo import PPORecipe

            ref = ModelRef("ft:x", "ftjob-rm", "reward_model", TINY, [], "jobs/ftjob-rm/adapter.tar.gz")
            ctx = local_context(tmp_path, model=TINY, method=method_of("ppo", PpoHyperparameters(reward_model="ft:x")),
                                training_type=lora, training_rows=[{"prompt": "Hi"}],
                                settings=replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE),
                                references={"reward_model": ref})
            PPORecipe(ctx).setup()
        else:
            run(tmp_path, kind, lora, setup_only=True)
    error = failure.value
    assert (error.code, error.param) == ("invalid_training_type", "training_type.target_modules")
    assert "['query_key_value'] not found" in error.message
