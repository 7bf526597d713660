"""Supervised fine-tuning: the loss on known numbers, and real jobs through a real worker.

One worker process (the module-scoped ``live`` fixture) runs every job here on tiny-random-llama.
The failing job runs before the succeeding ones: the fixture stops the worker as soon as the last
test returns, and a job reported failed may still be cleaning up in the worker at that moment.
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
from torch import nn

from service.jobs.spec import SupervisedHyperparameters
from service.settings import Settings
from tests.conftest import MODEL_CACHE, LiveService
from workers.loop import accumulate, make_accelerator
from workers.token_logps import TokenLogps, TokenPredictions, token_nll, token_predictions

# --------------------------------------------------------------------------- known answers


def test_token_nll_and_accuracy_on_known_numbers() -> None:
    # Two trained tokens over a 3-token vocabulary.
    # row 0: logits (2, 0, 0), target 0: log p = 2 - ln(e^2 + 2) = -0.23954476622188414; argmax 0 == 0
    # row 1: logits (0, 1, 0), target 2: log p = 0 - ln(e + 2)   = -1.5514447139320509;  argmax 1 != 2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    predictions = token_predictions(logits, torch.tensor([0, 2]), torch.tensor([0, 0]))
    assert predictions.logps.tolist() == pytest.approx([-0.23954476622188414, -1.5514447139320509], abs=1e-12)
    assert predictions.correct.tolist() == [True, False]
    loss, metrics = token_nll(predictions)
    # (0.23954476622188414 + 1.5514447139320509) / 2
    assert float(loss.detach()) == pytest.approx(0.8954947400769675, abs=1e-12)
    assert metrics == {"loss": pytest.approx(0.8954947400769675, abs=1e-12), "mean_token_accuracy": 0.5}
    loss.backward()
    # d(-mean log p)/d logits = (softmax - onehot) / N
    assert logits.grad is not None
    assert float(logits.grad[0, 0]) == pytest.approx((math.e**2 / (math.e**2 + 2) - 1) / 2, abs=1e-12)


def test_token_nll_of_nothing_is_zero() -> None:
    nothing = torch.zeros(0, dtype=torch.long)
    empty = TokenPredictions(torch.zeros(0), nothing.bool(), nothing)
    loss, metrics = token_nll(empty)
    assert float(loss) == 0.0 and metrics["mean_token_accuracy"] == 0.0


def test_token_logps_match_the_models_own_loss(tmp_path: Path) -> None:
    """LM head on trained positions only == transformers' full-logits loss with ``labels``."""
    from transformers import AutoModelForCausalLM

    from workers.base_models import TINY_RANDOM_LLAMA, load_tokenizer, resolve_base_model
    from workers.batching import collate_supervised
    from workers.data import normalize_supervised, tokenize_supervised

    settings = replace(Settings.from_env(tmp_path), model_cache_dir=MODEL_CACHE)
    path = resolve_base_model(TINY_RANDOM_LLAMA, settings)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    rows = [SFT_ROWS[0], MULTI_TURN]
    examples = [tokenize_supervised(normalize_supervised(r), tokenizer, 256) for r in rows]
    batch = collate_supervised([e for e in examples if e is not None], tokenizer.pad_token_id)
    with torch.no_grad():
        predictions = TokenLogps(model)(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        ours, _ = token_nll(predictions)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_accumulated_gradient_equals_the_whole_batch_gradient() -> None:
    """Token-weighted micro-batches under accelerate's accumulation = one batch of all tokens."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.randn(7)
    group = [[0, 1, 2, 3, 4], [5, 6]]  # unequal micro-batches

    def grads(accumulation_steps: int, split: list[list[int]]) -> torch.Tensor:
        torch.manual_seed(1)
        layer = nn.Linear(3, 1)
        hp = SupervisedHyperparameters(gradient_accumulation_steps=accumulation_steps)
        accelerator = make_accelerator(hp)

        def micro(indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]:
            loss = ((layer(x[indices]).squeeze(-1) - y[indices]) ** 2).mean()
            return loss, {"loss": float(loss.detach())}, len(indices)

        weights = [len(i) / 7 for i in split]
        metrics, tokens = accumulate(accelerator, layer, split, micro, weights)
        assert tokens == 7
        assert layer.weight.grad is not None
        return torch.cat([layer.weight.grad.flatten(), metrics["loss"] * torch.ones(1)])

    assert torch.allclose(grads(2, group), grads(1, [group[0] + group[1]]), atol=1e-6)


# --------------------------------------------------------------------------- real jobs

SFT_ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a in range(1, 9) for b in range(1, 5)
]
MULTI_TURN: dict[str, Any] = {"messages": [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "5.", "weight": 0},
    {"role": "user", "content": "Are you sure?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
]}
VALIDATION_ROWS: list[dict[str, Any]] = [
    {"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
    for a in (9, 10) for b in (1, 3)
]


def job(file_id: str, hyperparameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    hp = {"batch_size": 4, **hyperparameters}
    return {"model": "tiny-random-llama", "training_file": file_id, "seed": 7, **extra,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}


def extract(archive: bytes, target: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def test_a_file_that_trains_nothing_is_refused_at_create(live: LiveService) -> None:
    silent = [{"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello", "weight": 0}]}]
    uploaded = live.upload(silent * 3, "silent.jsonl")
    assert uploaded["status"] == "error" and "weight 0" in uploaded["status_details"]
    r = live.api.client.post("/v1/fine_tuning/jobs", headers=live.headers, json=job(uploaded["id"], {}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_training_file"


def test_max_length_that_leaves_nothing_to_train_fails_the_job(live: LiveService) -> None:
    train = live.upload(SFT_ROWS[:4], "sft-short.jsonl")
    # SmolLM2's template writes a default system prompt longer than 16 tokens before any answer.
    done = live.run(job(train["id"], {"max_length": 16, "max_steps": 1}))
    assert done["status"] == "failed"
    assert done["error"]["code"] == "invalid_training_file" and done["error"]["param"] == "training_file"
    assert "max_length=16" in done["error"]["message"]


def test_lora_sft_job_trains_and_saves_an_adapter(live: LiveService, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = live.upload([*SFT_ROWS, MULTI_TURN], "sft.jsonl")
    validation = live.upload(VALIDATION_ROWS, "sft-val.jsonl")
    # max_length=48 cuts the 52-token multi-turn example (its trained turn keeps 5 tokens) only.
    done = live.run(job(train["id"], {"max_steps": 6, "learning_rate": 1e-2, "eval_every_steps": 3,
                                      "checkpoint_every_steps": 3, "max_length": 48},
                        validation_file=validation["id"]))
    assert done["status"] == "succeeded", done["error"]
    events = live.get(f"/v1/fine_tuning/jobs/{done['id']}/events?order=asc&limit=100").json()["data"]
    warnings = [e["message"] for e in events if e["level"] == "warn"]
    assert "1 of 33 examples in training_file were truncated to max_length=48" in warnings
    assert done["progress"] == {"step": 6, "total_steps": 6} and done["trained_tokens"] > 0
    loss = live.metric(done["id"], "loss")
    assert len(loss) == 6 and loss[0] == pytest.approx(math.log(49152), abs=0.5)  # a random model at first
    assert sum(loss[-2:]) < sum(loss[:2])
    step_2 = live.get(f"/v1/fine_tuning/jobs/{done['id']}/metrics?step_from=2&step_to=2").json()["data"]
    assert {"loss", "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate",
            "tokens_per_second"} <= {p["name"] for p in step_2}
    eval_loss = live.get(f"/v1/fine_tuning/jobs/{done['id']}/metrics?name=eval/loss").json()["data"]
    assert [p["step"] for p in eval_loss] == [3, 6] and eval_loss[1]["value"] < eval_loss[0]["value"]
    assert len(live.metric(done["id"], "eval/mean_token_accuracy")) == 2
    assert all(0.0 <= a <= 1.0 for a in live.metric(done["id"], "mean_token_accuracy"))
    ckpts = live.get(f"/v1/fine_tuning/jobs/{done['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts] == [6, 3] and "mean_token_accuracy" in ckpts[0]["metrics"]

    adapter = extract(live.get(f"/v1/fine_tuning/jobs/{done['id']}/adapter").content, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(str(MODEL_CACHE / "tiny-random-llama"))
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0


def test_full_sft_job_saves_changed_weights(live: LiveService, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    train = live.upload(SFT_ROWS, "sft-full.jsonl")
    done = live.run(job(train["id"], {"max_steps": 2, "learning_rate": 1e-3}, training_type={"type": "full"}))
    assert done["status"] == "succeeded", done["error"]
    folder = extract(live.get(f"/v1/fine_tuning/jobs/{done['id']}/adapter").content, tmp_path / "full")
    assert not (folder / "adapter_config.json").exists() and (folder / "tokenizer_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(MODEL_CACHE / "tiny-random-llama"))
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("self_attn" in n for n in changed) and any("mlp" in n for n in changed)
