"""Online RL in process, on tiny-random-llama: the shared base, the engine, and the PPO recipe on the loop.

The known-answer tests of the PPO math are in ``test_ppo_core.py``; the live jobs in
``test_recipe_ppo.py``. Here:

* log-probs recomputed after sampling equal the sampler's own (left-padded prompts included), and a
  reward model loaded as a third adapter on the shared base scores exactly like the merged model;
* value gradients do not depend on activation checkpointing (each role's backward runs with its
  own adapter active);
* with LoRA dropout 0.5 the first update sees ratio 1 and clips nothing (dropout is off in every
  role, as in TRL), and the saved adapter still says 0.5;
* skipped (non-finite) updates advance the schedule, the logged learning rate is the one the
  updates used, and the third non-finite loss fails the job;
* a PPO job paused after a checkpoint and resumed ends with exactly the adapter, value function
  and metrics of an uninterrupted run.
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
from transformers import GenerationConfig, PreTrainedTokenizerBase

from service.jobs.spec import LoraTraining, PpoHyperparameters
from service.settings import Settings
from service.storage import LocalStore
from tests.conftest import MODEL_CACHE
from workers.archives import final_adapter_key, store_dir_archive
from workers.batching import left_pad
from workers.context import JobFailure, ModelRef
from workers.data import normalize_prompt, prompt_ids
from workers.local import MemoryReporter, local_context, method_of
from workers.loop import Optimization, make_accelerator, make_optimizer
from workers.modeling import (
    apply_training_type,
    enable_activation_checkpointing,
    eos_token_ids,
    load_causal_lm,
    load_sequence_classifier,
)
from workers.recipes.rl.core import response_mask
from workers.recipes.rl.engine import AdapterReward, PPOEngine, Prompt, grouped_response_logps, response_logps
from workers.recipes.rl.models import POLICY, REWARD, VALUE, SharedBase
from workers.reward_scoring import SequenceScores, load_reward_model

TINY = "tiny-random-llama"
QUESTIONS = ("What is 2 plus 2?", "Hi", "Name three colours, please.", "Why is the sky blue?")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedTokenizerBase]:
    from workers.base_models import load_tokenizer, resolve_base_model

    settings = replace(Settings.from_env(tmp_path_factory.mktemp("rl-data")), model_cache_dir=MODEL_CACHE)
    path = resolve_base_model(TINY, settings)
    return path, load_tokenizer(path)


def shared_base(path: Path, seed: int = 0, lora: LoraTraining | None = None, checkpointing: bool = False,
                value_scale: float = 0.0) -> SharedBase:
    """A shared base whose policy differs from the reference (and, with ``value_scale``, whose value
    adapter and head are non-zero, so value gradients reach the value LoRA)."""
    base = load_causal_lm(path)
    base.requires_grad_(False)
    if checkpointing:
        enable_activation_checkpointing(base)
    models = SharedBase(base, lora or LoraTraining(r=4), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in models.peft.named_parameters():
            if f"lora_B.{POLICY}" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            if value_scale and f"lora_B.{VALUE}" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * value_scale)
        if value_scale and models.value_head is not None:
            models.value_head.weight.copy_(torch.randn(models.value_head.weight.shape, generator=generator))
    return models.eval()


def prompts(tokenizer: PreTrainedTokenizerBase, n: int = 4) -> list[Prompt]:
    out = []
    for q in (QUESTIONS * 4)[:n]:
        messages = [{"role": "user", "content": q}]
        out.append(Prompt(messages, prompt_ids(messages, tokenizer, 50), {"question": q}))
    return out


def engine_for(models: SharedBase, tokenizer: PreTrainedTokenizerBase, hp: PpoHyperparameters,
               total_updates: int = 100, **kwargs: Any) -> PPOEngine:
    accelerator = make_accelerator(hp)
    optimizer, scheduler = make_optimizer(models.trainable, hp, total_updates)
    optim = Optimization(accelerator, optimizer, scheduler, models.trainable, hp.max_grad_norm)
    return PPOEngine(models, tokenizer, hp, accelerator=accelerator, optim=optim, seed=0,
                     eos_ids=eos_token_ids(models.peft.get_base_model(), tokenizer),
                     reward=AdapterReward(models, accelerator), **kwargs)


@pytest.fixture(scope="module")
def reward_adapter(tiny: tuple[Path, PreTrainedTokenizerBase], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A "trained" SEQ_CLS LoRA reward model on tiny-random-llama: non-zero LoRA B and a moved head."""
    path, tokenizer = tiny
    torch.manual_seed(3)
    rm = apply_training_type(load_sequence_classifier(path, torch.float32, tokenizer.pad_token_id),
                             LoraTraining(r=4), seed=3, task_type="SEQ_CLS")
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
        rm.get_base_model().score.modules_to_save["default"].weight.add_(0.5)
    out = tmp_path_factory.mktemp("rm") / "rm"
    rm.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- the shared base


def test_prompts_render_like_training_prompts(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    _, tokenizer = tiny
    as_messages = normalize_prompt({"messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"}], "answer": "4"})
    as_string = normalize_prompt({"prompt": "Hi"})
    assert as_string == [{"role": "user", "content": "Hi"}] and as_messages[-1] == as_string[0]
    ids = prompt_ids(as_string, tokenizer, 1000)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert prompt_ids(as_string, tokenizer, 5) == ids[-5:]  # cut on the left
    queries, mask = left_pad([[7, 8, 9], [5]], pad_token_id=2)
    assert queries.tolist() == [[7, 8, 9], [2, 2, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_recomputed_log_probs_equal_the_samplers(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    """What PPO trains on (a forward over prompt + response) is what sampling drew from,
    for left-padded prompts too; and the reference (adapters off) differs from the policy."""
    path, tokenizer = tiny
    models = shared_base(path)
    rows = [p.ids for p in prompts(tokenizer, 3)]
    queries, query_mask = left_pad(rows, tokenizer.pad_token_id)
    temperature = 0.7
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=6,
                              eos_token_id=[2, 0], pad_token_id=tokenizer.pad_token_id, use_cache=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = models.peft.generate(input_ids=queries, attention_mask=query_mask, generation_config=config,
                                   output_logits=True, return_dict_in_generate=True)
        responses = out.sequences[:, queries.shape[1]:]
        mask, _ = response_mask(responses, [2, 0])
        steps = [torch.log_softmax(step.float() / temperature, dim=-1) for step in out.logits]
        sampler = torch.stack(steps, dim=1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        ids = torch.cat([queries, responses], dim=1)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        logps, entropy = response_logps(models, ids, attention, responses, temperature, with_entropy=True)
        torch.testing.assert_close(logps[mask], sampler[mask], atol=1e-4, rtol=0)
        assert entropy is not None and bool((entropy[mask] > 0).all())
        # the shortest prompt alone (no padding) gives the same numbers
        alone = torch.cat([torch.tensor([rows[1]]), responses[1:2]], dim=1)
        alone_mask = torch.cat([torch.ones(1, len(rows[1]), dtype=torch.long), mask[1:2].long()], dim=1)
        single, _ = response_logps(models, alone, alone_mask, responses[1:2], temperature)
        torch.testing.assert_close(single[mask[1:2]], logps[1:2][mask[1:2]], atol=1e-4, rtol=0)
        with models.reference():
            reference, _ = response_logps(models, ids, attention, responses, temperature)
        assert float((reference[mask] - logps[mask]).abs().max()) > 1e-3


def test_a_group_runs_its_prompt_once_with_the_same_log_probs_and_gradients(
        tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    """GRPO's update runs each prompt once for its G responses (a KV cache gathered per row): the
    log-probs, entropies and LoRA gradients equal those of whole prompt + response rows, for
    left-padded prompts of different lengths, padded responses, and slices that cut a group in two;
    with activation checkpointing it falls back to whole rows."""
    path, tokenizer = tiny
    models = shared_base(path)  # a non-zero policy adapter: the prompt's KV depends on it
    group = 3
    queries, query_mask = left_pad([p.ids for p in prompts(tokenizer, 2)], tokenizer.pad_token_id)
    queries, query_mask = queries.repeat_interleave(group, 0), query_mask.repeat_interleave(group, 0)
    responses = torch.randint(3, 200, (6, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1] * 5, [1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]).bool()
    responses = responses.masked_fill(~mask, int(tokenizer.pad_token_id))
    policy = [p for n, p in models.peft.named_parameters() if "lora_" in n and f".{POLICY}." in n]

    def run(shared: bool, rows: slice) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        models.peft.zero_grad()
        if shared:
            logps, entropy = grouped_response_logps(models, queries, query_mask, responses, mask, group, rows, 0.7,
                                                    with_entropy=True)
        else:
            ids = torch.cat([queries, responses], 1)[rows]
            attention = torch.cat([query_mask, mask.long()], 1)[rows]
            logps, entropy = response_logps(models, ids, attention, responses[rows], 0.7, with_entropy=True)
        assert entropy is not None
        ((logps * mask[rows]).sum() + (entropy * mask[rows]).sum()).backward()
        return logps.detach(), entropy.detach(), [p.grad.clone() for p in policy if p.grad is not None]

    for rows in (slice(None), slice(1, 5), slice(2, 3)):
        ours, whole = run(True, rows), run(False, rows)
        keep = mask[rows]
        torch.testing.assert_close(ours[0][keep], whole[0][keep], atol=2e-5, rtol=0)
        torch.testing.assert_close(ours[1][keep], whole[1][keep], atol=2e-5, rtol=0)
        assert len(ours[2]) == len(policy) == len(whole[2])
        for a, b in zip(ours[2], whole[2], strict=True):  # equal up to the order of float sums
            assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-7, (float((a - b).norm()), float(b.norm()))
    assert float(ours[2][0].abs().max()) > 0
    # activation checkpointing turns the decoder's cache off in training: whole rows, same numbers
    checkpointed = shared_base(path, checkpointing=True)
    checkpointed.train()
    assert checkpointed.response_hidden(queries[::group], query_mask[::group], responses, mask,
                                        torch.arange(6) // group) is None


def test_reward_adapter_on_the_shared_base_scores_like_the_reward_model(
        tiny: tuple[Path, PreTrainedTokenizerBase], reward_adapter: Path) -> None:
    path, tokenizer = tiny
    models = shared_base(path)
    models.add_reward_adapter(reward_adapter)
    assert set(models.peft.peft_config) == {POLICY, VALUE, REWARD}
    rows = [prompt_ids([{"role": "user", "content": "What is 2 plus 2?"}], tokenizer, 100) + [36, 30, 2],
            prompt_ids([{"role": "user", "content": "Hi"}], tokenizer, 100) + [19556, 2]]
    merged, _ = load_reward_model(path, reward_adapter)
    with torch.no_grad():
        expected = torch.cat([SequenceScores(merged)(torch.tensor([r]), torch.ones(1, len(r)).long())
                              for r in rows])
        ids, attention = left_pad(rows, tokenizer.pad_token_id)
        assert models.reward_head is not None
        with models.using(REWARD):
            scores = models.reward_head(models.hidden(ids, attention)[:, -1]).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # switching adapters never freezes policy or value, never unfreezes the reward model
    for adapter in (VALUE, REWARD, POLICY):
        with models.using(adapter):
            assert all(p.requires_grad for p in models.trainable)
            assert not any(p.requires_grad for n, p in models.peft.named_parameters() if f".{REWARD}." in n)
    with models.reference():
        pass
    assert all(p.requires_grad for p in models.trainable)


# --------------------------------------------------------------------------- the update's correctness


def test_value_gradients_do_not_depend_on_activation_checkpointing(
        tiny: tuple[Path, PreTrainedTokenizerBase], reward_adapter: Path) -> None:
    """Checkpointing recomputes each layer in the backward with the adapter active *then*: the value
    loss's backward must run with the value adapter, or its LoRA learns from the policy's activations."""
    path, tokenizer = tiny
    hp = PpoHyperparameters(reward_model="rm", rollout_batch_size=4, mini_batch_size=4, max_new_tokens=5,
                            temperature=0.7)
    grads = []
    for checkpointing in (False, True):
        models = shared_base(path, checkpointing=checkpointing, value_scale=0.3)
        models.add_reward_adapter(reward_adapter)
        engine = engine_for(models, tokenizer, hp)
        torch.manual_seed(5)
        rollout, _ = engine.rollout(prompts(tokenizer))
        advantages = engine.advantages(rollout)
        models.train()
        finite, _ = engine._micro_backward(rollout, advantages, torch.arange(4), 1.0)
        assert finite
        grads.append({n: p.grad.clone() for n, p in models.peft.named_parameters()
                      if p.grad is not None and f".{VALUE}." in n})
        grads[-1]["policy"] = torch.cat([p.grad.flatten() for p in models.policy_params])
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) > 2
    for name in plain:
        assert float(plain[name].abs().max()) > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_scheduler_advances_on_skipped_updates_and_logs_the_rate_used(
        tiny: tuple[Path, PreTrainedTokenizerBase], reward_adapter: Path) -> None:
    """4 mini-batch updates a step over 8 planned, linear decay from 1e-3: step 1's updates use
    1e-3 x (1 - j/8) for j = 0..3, one of them skipped for a non-finite loss."""
    path, tokenizer = tiny
    models = shared_base(path)
    models.add_reward_adapter(reward_adapter)
    hp = PpoHyperparameters(reward_model="rm", rollout_batch_size=4, mini_batch_size=1, max_new_tokens=3,
                            ppo_epochs=1, learning_rate=1e-3, lr_scheduler="linear")
    seen: list[tuple[int, int]] = []
    engine = engine_for(models, tokenizer, hp, total_updates=8, on_nan=lambda loss, step, n: seen.append((step, n)))
    rollout, _ = engine.rollout(prompts(tokenizer))
    advantages = engine.advantages(rollout)
    advantages["advantages"][2] = math.nan  # the mini-batch holding row 2 is skipped
    metrics = engine.optimize(rollout, advantages, step=1)
    assert seen == [(1, 1)]
    assert engine.optim.scheduler.last_epoch == 4  # the skipped update advanced the schedule too
    assert metrics["learning_rate"] == pytest.approx(1e-3 * (1 - 1.5 / 8), rel=1e-9)
    assert engine.optim.learning_rate() == pytest.approx(1e-3 * (1 - 4 / 8), rel=1e-9)


def test_non_finite_losses_skip_the_update_and_fail_the_job_on_the_third(
        tiny: tuple[Path, PreTrainedTokenizerBase], reward_adapter: Path) -> None:
    path, tokenizer = tiny
    models = shared_base(path)
    models.add_reward_adapter(reward_adapter)
    hp = PpoHyperparameters(reward_model="rm", rollout_batch_size=4, mini_batch_size=4, max_new_tokens=3,
                            ppo_epochs=4)
    seen: list[tuple[int, int]] = []
    engine = engine_for(models, tokenizer, hp, on_nan=lambda loss, step, count: seen.append((step, count)))
    rollout, timing = engine.rollout(prompts(tokenizer))
    assert set(timing) == {"time/generation", "time/scoring"} and rollout.scores.shape == (4,)
    advantages = engine.advantages(rollout)
    before = [p.detach().clone() for p in models.trainable]
    advantages["advantages"] = torch.full_like(advantages["advantages"], math.nan)
    with pytest.raises(JobFailure) as failure:
        engine.optimize(rollout, advantages, step=7)
    assert failure.value.code == "nan_loss"
    assert seen == [(7, 1), (7, 2)]  # two skipped updates reported, the third fails the job
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, models.trainable, strict=True))


# --------------------------------------------------------------------------- the recipe, in process


def ppo_context(tmp: Path, reward_adapter: Path, *, dropout: float = 0.0, reporter: MemoryReporter | None = None,
                **hyperparameters: Any) -> Any:
    store = LocalStore(tmp / "objects")
    key = store_dir_archive(store, reward_adapter, "jobs/ftjob-rm/adapter.tar.gz")
    ref = ModelRef(f"ft:{TINY}:local::ftjob-rm", "ftjob-rm", "reward_model", TINY, [], key)
    hp = PpoHyperparameters(**{"reward_model": ref.name, "rollout_batch_size": 4, "mini_batch_size": 2,
                               "max_new_tokens": 4, "temperature": 0.7, "ppo_epochs": 2, "learning_rate": 1e-3,
                               "n_epochs": 2, "max_steps": 4, **hyperparameters})
    rows = [{"prompt": q} for q in QUESTIONS * 2]
    return local_context(tmp, model=TINY, method=method_of("ppo", hp), seed=9,
                         training_type=LoraTraining(r=4, dropout=dropout, target_modules=["q_proj", "v_proj"]),
                         training_rows=rows, store=store, reporter=reporter or MemoryReporter(),
                         settings=replace(Settings.from_env(tmp / "data"), model_cache_dir=MODEL_CACHE),
                         references={"reward_model": ref})


def run_recipe(ctx: Any) -> Any:
    from workers.recipes.rl.ppo import PPORecipe

    recipe = PPORecipe(ctx)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


def archive_files(store: LocalStore, key: str, tmp: Path) -> dict[str, bytes]:
    path = tmp / "archive.tar.gz"
    store.download_file(key, path)
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_dropout_is_off_so_the_first_update_has_ratio_one(tmp_path: Path, reward_adapter: Path) -> None:
    """One update a step, so each step's update is its first mini-batch, on the policy that sampled it.
    Step 1's LoRA B is zero (dropout cannot show there); step 2's policy has moved, so a dropout that
    is on in updates and off in rollouts would make the ratio differ from 1 and clip."""
    ctx = ppo_context(tmp_path, reward_adapter, dropout=0.5, mini_batch_size=4, ppo_epochs=1, max_steps=3,
                      learning_rate=1e-2)
    result = run_recipe(ctx)
    assert result.status == "succeeded"
    assert [step for step, _ in ctx.reporter.steps] == [1, 2, 3]
    assert abs(ctx.reporter.steps[-1][1]["objective/kl"]) > 1e-3  # the policy did move away from the reference
    for step, values in ctx.reporter.steps:
        assert values["val/ratio"] == pytest.approx(1.0, abs=1e-5), step
        assert values["policy/clipfrac_avg"] == 0.0, step
        assert values["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-6), step
        assert 0 < values["timing/generation_share"] < 1, step  # sampling's share of the step, every step
    files = archive_files(ctx.store, final_adapter_key(ctx.job_id, attempt=ctx.attempt), tmp_path)
    assert json.loads(files["adapter_config.json"])["lora_dropout"] == 0.5
    assert "value_head.safetensors" not in files  # the result is the policy alone
    assert any("dropout 0.5" in m for m in ctx.reporter.messages())


def test_paused_then_resumed_ppo_ends_like_an_uninterrupted_run(tmp_path: Path, reward_adapter: Path) -> None:
    straight = ppo_context(tmp_path / "straight", reward_adapter, checkpoint_every_steps=2)
    assert run_recipe(straight).status == "succeeded"

    paused = ppo_context(tmp_path / "paused", reward_adapter, checkpoint_every_steps=2,
                         reporter=MemoryReporter(stop_at={3: "pause"}))
    assert run_recipe(paused).status == "paused"
    steps, key, _ = paused.reporter.checkpoints[-1][0], paused.reporter.checkpoints[-1][2], None
    assert steps == 3 and [s for s, _ in paused.reporter.steps] == [1, 2, 3]
    files = archive_files(paused.store, key, tmp_path)
    assert {"adapter_model.safetensors", "value/adapter_model.safetensors", "value_head.safetensors",
            "training_state.pt"} <= set(files)
    resumed = replace(paused, resume_from=(steps, key), reporter=MemoryReporter())
    assert run_recipe(resumed).status == "succeeded"
    assert resumed.reporter.resumed_at == [3] and [s for s, _ in resumed.reporter.steps] == [4]

    ours = archive_files(resumed.store, final_adapter_key(resumed.job_id, attempt=0), tmp_path / "a")
    theirs = archive_files(straight.store, final_adapter_key(straight.job_id, attempt=0), tmp_path / "b")
    from safetensors.torch import load

    a, b = load(ours["adapter_model.safetensors"]), load(theirs["adapter_model.safetensors"])
    assert a.keys() == b.keys() and any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    # the resumed step's numbers are the uninterrupted run's step 4: same policy, value, KL and sampler
    (_, last), = resumed.reporter.steps
    expected = straight.reporter.steps[3][1]
    for name in ("objective/scores", "objective/kl", "loss/value_avg", "val/explained_variance", "kl_coef",
                 "learning_rate", "episode"):
        assert last[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
