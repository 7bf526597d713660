"""Reward-model training: the batch loss on known numbers, pooling and loading, and a real job.

One worker process (the module-scoped ``live`` fixture) runs the job on tiny-random-llama.
"""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.jobs.spec import LoraTraining
from service.settings import Settings
from tests.conftest import MODEL_CACHE, LiveService
from workers.batching import collate_pairs
from workers.data import TokenizedPair, TokenizedSequence
from workers.modeling import apply_training_type, copy_decoder, load_sequence_classifier
from workers.recipes.reward_model import pair_loss
from workers.reward_scoring import SequenceScores, load_reward_model, score

# --------------------------------------------------------------------------- known answers


def seq(*ids: int) -> TokenizedSequence:
    return TokenizedSequence(list(ids), [0] + [1] * (len(ids) - 1))


def test_margins_flow_from_collate_into_the_loss() -> None:
    pairs = [TokenizedPair(seq(5, 6, 7), seq(5, 8), margin=1.0), TokenizedPair(seq(5, 9), seq(5, 9, 9, 9))]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["margin"].tolist() == [1.0, 0.0]  # a pair without a margin counts as 0
    # collate order [chosen_0, chosen_1, rejected_0, rejected_1]
    scores = torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    # diffs - margins = (2 - 1 - 1, 0.5 - 1 - 0) = (0, -0.5)
    # loss = mean(softplus(0), softplus(0.5)) = (0.6931471805599453 + 0.9740769841801067) / 2
    loss, metrics = pair_loss(scores, batch)
    assert float(loss.detach()) == pytest.approx(0.8336120823700259, abs=1e-12)
    assert metrics == {"loss": pytest.approx(0.8336120823700259, abs=1e-12), "accuracy": 0.5, "margin": 0.25,
                       "reward/mean": 1.125, "reward/min": 0.5, "reward/max": 2.0}
    # + 0.1 * mean((2 + 1)^2, (0.5 + 1)^2) = 0.1 * 5.625
    centred, _ = pair_loss(scores, batch, center_rewards_coefficient=0.1)
    assert float(centred.detach()) == pytest.approx(1.396112082370026, abs=1e-12)
    loss.backward()
    # d loss / d chosen_0 = -sigmoid(-0) / 2
    assert scores.grad is not None and float(scores.grad[0]) == pytest.approx(-0.25, abs=1e-12)


def test_pairs_without_margins_are_plain_bradley_terry() -> None:
    batch = collate_pairs([TokenizedPair(seq(5, 6), seq(5, 7)), TokenizedPair(seq(5, 8), seq(5, 9))], 0)
    assert "margin" not in batch
    loss, _ = pair_loss(torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64), batch)
    # mean(softplus(-1), softplus(0.5))
    assert float(loss) == pytest.approx(0.6436693358491647, abs=1e-12)


# --------------------------------------------------------------------------- the model pieces


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedTokenizerBase]:
    from workers.base_models import TINY_RANDOM_LLAMA, load_tokenizer, resolve_base_model

    settings = replace(Settings.from_env(tmp_path_factory.mktemp("rm-data")), model_cache_dir=MODEL_CACHE)
    path = resolve_base_model(TINY_RANDOM_LLAMA, settings)
    return path, load_tokenizer(path)


def classifier(path: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    torch.manual_seed(0)
    return load_sequence_classifier(path, torch.float32, tokenizer.pad_token_id).eval()


def test_score_is_read_at_the_last_attended_token(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    path, tokenizer = tiny
    model = classifier(path, tokenizer)
    short, long = seq(1, 20, 30, 2), seq(1, 20, 30, 40, 50, 60, 2)  # both end with <|im_end|> (= pad)
    batch = collate_pairs([TokenizedPair(short, long)], tokenizer.pad_token_id)
    with torch.no_grad():
        batched = SequenceScores(model)(batch["input_ids"], batch["attention_mask"])
        hidden = model.model(input_ids=torch.tensor([short.input_ids])).last_hidden_state
        alone = model.score(hidden[:, -1]).squeeze(-1)
    assert float(batched[0]) == pytest.approx(float(alone[0]), abs=1e-5)
    assert float(batched[0]) != pytest.approx(float(batched[1]), abs=1e-6)


def test_load_reward_model_full_and_chained(tiny: tuple[Path, PreTrainedTokenizerBase],
                                            tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    path, tokenizer = tiny
    pairs = [("What is 2 plus 2?", "4."), ([{"role": "user", "content": "Hi"}], "Hello there, how are you?")]

    # Full: the archive is the classifier itself, with its tokenizer.
    full = classifier(path, tokenizer)
    with torch.no_grad():
        full.score.weight.mul_(3.0)
    full.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    expected = score(full, tokenizer, pairs)
    loaded, loaded_tokenizer = load_reward_model(path, tmp_path / "full")
    assert torch.allclose(score(loaded, loaded_tokenizer, pairs), expected, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())

    # Chained: an SFT LoRA parent (non-zero B) under a reward-model LoRA adapter (with its head).
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_pretrained(str(path))
    parent = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                           task_type="CAUSAL_LM"))
    parent.save_pretrained(tmp_path / "parent")
    rm = classifier(path, tokenizer)
    copy_decoder(rm, parent.merge_and_unload())
    rm_lora = apply_training_type(rm, LoraTraining(r=4), seed=2, task_type="SEQ_CLS")
    assert isinstance(rm_lora, PeftModel)
    trainable = {n for n, p in rm_lora.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    with torch.no_grad():
        rm_lora.get_base_model().score.modules_to_save["default"].weight.add_(0.5)  # a "trained" head
    rm_lora.save_pretrained(tmp_path / "rm")
    expected = score(rm_lora, tokenizer, pairs)
    loaded, _ = load_reward_model(path, tmp_path / "rm", parent_adapter_dirs=[tmp_path / "parent"])
    assert torch.allclose(score(loaded, tokenizer, pairs), expected, atol=1e-5)
    without_parent, _ = load_reward_model(path, tmp_path / "rm")
    assert not torch.allclose(score(without_parent, tokenizer, pairs), expected, atol=1e-3)


# --------------------------------------------------------------------------- a real job


def arithmetic_pairs(seed: int, n: int) -> list[dict[str, Any]]:
    """Chosen: the short correct answer. Rejected: a long rambling one (that hedges)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        rambling = (f"Well, let me think about this step by step. First I take {a}, then I add {b} to it, "
                    f"and after carefully counting it all up I believe it might be {a + b}.")
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": rambling})
    return rows


def test_reward_model_job_learns_an_easy_preference(live: LiveService, tmp_path: Path) -> None:
    train = [{**row, "margin": 0.5} if i % 2 else row for i, row in enumerate(arithmetic_pairs(1, 64))]
    held_out = arithmetic_pairs(2, 32)
    openai_format = [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
                      "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
                      "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]}
                     for r in held_out]
    train_file, validation_file = live.upload(train, "rm.jsonl"), live.upload(openai_format, "rm-val.jsonl")
    done = live.run({"model": "tiny-random-llama", "training_file": train_file["id"], "seed": 11,
                     "validation_file": validation_file["id"], "suffix": "rm",
                     "method": {"type": "reward_model", "reward_model": {"hyperparameters": {
                         "batch_size": 4, "max_steps": 8, "learning_rate": 1e-3, "eval_every_steps": 4,
                         "checkpoint_every_steps": 4}}}})
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"].startswith(f"ft:tiny-random-llama:{live.org}:rm:")
    assert done["progress"] == {"step": 8, "total_steps": 8}
    loss = live.metric(done["id"], "loss")
    assert len(loss) == 8 and loss[-1] < loss[0]
    step_2 = live.get(f"/v1/fine_tuning/jobs/{done['id']}/metrics?step_from=2&step_to=2").json()["data"]
    names = {p["name"] for p in step_2}
    assert {"loss", "accuracy", "margin", "reward/mean", "reward/min", "reward/max", "grad_norm",
            "learning_rate", "num_tokens", "tokens_per_second"} <= names
    eval_accuracy = live.get(f"/v1/fine_tuning/jobs/{done['id']}/metrics?name=eval/accuracy").json()["data"]
    assert [p["step"] for p in eval_accuracy] == [4, 8]
    assert eval_accuracy[-1]["value"] >= 0.9
    assert len(live.metric(done["id"], "eval/loss")) == 2
    ckpts = live.get(f"/v1/fine_tuning/jobs/{done['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts] == [8, 4] and "accuracy" in ckpts[0]["metrics"]

    archive = live.get(f"/v1/fine_tuning/jobs/{done['id']}/adapter").content
    adapter = tmp_path / "rm-adapter"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(adapter, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    model, tokenizer = load_reward_model(MODEL_CACHE / "tiny-random-llama", adapter)
    chosen = score(model, tokenizer, [(r["prompt"], r["chosen"]) for r in held_out])
    rejected = score(model, tokenizer, [(r["prompt"], r["rejected"]) for r in held_out])
    accuracy = float((chosen > rejected).float().mean())
    assert accuracy >= 0.9 and float((chosen - rejected).mean()) > 0
    assert accuracy == pytest.approx(eval_accuracy[-1]["value"])  # the worker's eval scored the same way
