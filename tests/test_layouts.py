"""Every batch layout gives the same per-sequence log-probs (and rewards) on tiny-random-llama, fp32.

DPO: plain (chosen and rejected as separate padded rows, SDPA causal) against the shared-prompt
layout as a dense 4D mask on SDPA and as a flex-attention block mask. SFT: right-padded rows
against packed rows with restarting position ids (transformers derives the document mask on SDPA)
and with a flex document mask. Reward model: the same for its scores. Flex attention runs its eager
reference on the CPU (forward only), so these comparisons run under ``no_grad``; training with it
is CUDA's (``tests/test_gpu_numerics.py``).

Packing's pieces on known answers: best-fit decreasing, the padding share, and the layout choice.
Then whole jobs: an SFT job (and a reward-model job) logs the same losses packed and unpacked, and
reports its padding share before and after packing in one event.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from service.jobs.spec import LoraTraining, RewardModelHyperparameters, SupervisedHyperparameters
from service.settings import Settings
from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS
from workers import data as D
from workers.attention import Layout, choose_layout, use_flex
from workers.base_models import TINY_RANDOM_LLAMA, load_tokenizer, resolve_base_model
from workers.batching import collate_pairs, collate_supervised
from workers.local import MemoryReporter, local_context, method_of
from workers.modeling import load_causal_lm, load_sequence_classifier
from workers.packing import best_fit_decreasing, pack, padding_share, plan_rows
from workers.pairs import PairLogps, collate_plain, collate_shared
from workers.reward_scoring import SequenceScores
from workers.token_logps import TokenLogps

#: per-sequence sums of ~10-60 token log-probs of ~-10 each, fp32: rounding alone is ~1e-5
SUM_TOLERANCE = 1e-4
SFT_ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?" + " Please." * (a % 4)},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " Indeed." * (b % 3)}]}
    for a in range(1, 9) for b in range(1, 4)
]
#: one conversation three times as long as the others: packing then beats padding
LONG: dict[str, Any] = {"messages": [m for a in (1, 2, 3) for m in (
    {"role": "user", "content": f"What is {a} plus {a}? Please answer in a sentence."},
    {"role": "assistant", "content": f"{a} plus {a} is {2 * a}, as adding a number to itself doubles it."})]}
MEASURED: dict[str, float] = {}  # layout -> max |difference| from the reference layout, printed at the end


@pytest.fixture(scope="module")
def tiny() -> tuple[Path, PreTrainedTokenizerBase]:
    path = resolve_base_model(TINY_RANDOM_LLAMA, replace(Settings.from_env(MODEL_CACHE.parent),
                                                         model_cache_dir=MODEL_CACHE))
    return path, load_tokenizer(path)


def pairs_of(tokenizer: PreTrainedTokenizerBase) -> list[D.TokenizedPair]:
    pairs = [D.tokenize_preference(D.normalize_preference(r), tokenizer, 256) for r in PREFERENCE_ROWS[:6]]
    return [p for p in pairs if p is not None]


def examples_of(tokenizer: PreTrainedTokenizerBase) -> list[D.TokenizedExample]:
    examples = [D.tokenize_supervised(D.normalize_supervised(r), tokenizer, 256) for r in [LONG, *SFT_ROWS[:9]]]
    return [e for e in examples if e is not None]


def close(name: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float = SUM_TOLERANCE) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), float((ours - reference).abs().max()))
    print(f"layout {name}: max |difference| {MEASURED[name]:.2e}")
    torch.testing.assert_close(ours, reference, rtol=0, atol=tolerance)


# --------------------------------------------------------------------------- DPO layouts


def test_dpo_layouts_give_the_plain_layouts_log_probs(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    path, tokenizer = tiny
    model = load_causal_lm(path).eval()
    pairs, pad = pairs_of(tokenizer), tokenizer.pad_token_id
    with torch.no_grad():
        plain, plain_counts = PairLogps(model)(collate_plain(pairs, pad).to(torch.device("cpu")))
        mask, mask_counts = PairLogps(model)(collate_shared(pairs, pad).to(torch.device("cpu")))
        flex_model = copy.deepcopy(model)
        use_flex(flex_model)
        flex_batch = collate_shared(pairs, pad, flex=True).to(torch.device("cpu"))
        assert flex_batch.input_ids.shape[1] % 128 == 0  # a length bucket
        flex, flex_counts = PairLogps(flex_model)(flex_batch)
        # the flex model still runs plain batches on SDPA, unchanged
        flex_plain, _ = PairLogps(flex_model)(collate_plain(pairs, pad).to(torch.device("cpu")))
    assert torch.equal(plain_counts, mask_counts) and torch.equal(plain_counts, flex_counts)
    assert float(plain.abs().min()) > 1.0  # real sums, not zeros
    close("shared_mask", mask, plain)
    close("shared_flex", flex, plain)
    close("sdpa_or_flex on a plain batch", flex_plain, plain, tolerance=0.0)


def test_a_shared_prompt_mask_that_lets_completions_see_each_other_differs(
        tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    """The comparison above can fail: a block mask without the segment rule gives other log-probs."""
    from torch.nn.attention.flex_attention import create_block_mask

    path, tokenizer = tiny
    model = load_causal_lm(path).eval()
    use_flex(model)
    pairs, pad = pairs_of(tokenizer), tokenizer.pad_token_id
    batch = collate_shared(pairs, pad, flex=True).to(torch.device("cpu"))
    rows, width = batch.input_ids.shape
    batch.attention_mask = create_block_mask(lambda b, h, q, k: k <= q, rows, None, width, width, device="cpu")
    with torch.no_grad():
        wrong, _ = PairLogps(model)(batch)
        plain, _ = PairLogps(model)(collate_plain(pairs, pad).to(torch.device("cpu")))
    half = len(pairs)
    # random weights barely attend, but 100 times the tolerance: the rejected side saw the chosen one
    assert float((wrong[half:] - plain[half:]).abs().max()) > 100 * SUM_TOLERANCE


# --------------------------------------------------------------------------- packed SFT rows


def sequence_logps(predictions: Any, n: int) -> torch.Tensor:
    return torch.zeros(n).index_add(0, predictions.rows, predictions.logps)


def test_packed_rows_give_the_padded_rows_log_probs(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    path, tokenizer = tiny
    model = load_causal_lm(path).eval()
    examples, pad = examples_of(tokenizer), tokenizer.pad_token_id
    budget = max(len(e) for e in examples)  # the long one alone, the short ones 2-3 a row
    padded = collate_supervised(examples, pad)
    positions = pack(examples, budget, pad)
    flexed = pack(examples, budget, pad, bucket=True).to(torch.device("cpu"), flex=True)
    assert 1 < positions.input_ids.shape[0] < len(examples)
    assert positions.slots < padded["input_ids"].numel()
    tokens = sum(len(e) for e in examples)
    print(f"padding share of this batch: {1 - tokens / padded['input_ids'].numel():.3f} padded, "
          f"{1 - tokens / positions.slots:.3f} packed ({positions.input_ids.shape[0]} rows of "
          f"{positions.input_ids.shape[1]})")
    with torch.no_grad():
        reference = sequence_logps(TokenLogps(model)(padded["input_ids"], padded["attention_mask"],
                                                     padded["loss_mask"]), len(examples))
        by_positions = sequence_logps(TokenLogps(model)(positions.input_ids, None, positions.loss_mask,
                                                        position_ids=positions.position_ids,
                                                        rows=positions.documents), len(examples))
        flex_model = copy.deepcopy(model)
        use_flex(flex_model)
        by_flex = sequence_logps(TokenLogps(flex_model)(flexed.input_ids, flexed.attention_mask, flexed.loss_mask,
                                                        position_ids=flexed.position_ids, rows=flexed.documents),
                                 len(examples))
        # the same rows without restarting positions: RoPE sees other positions, so other log-probs
        shifted = sequence_logps(TokenLogps(model)(positions.input_ids, None, positions.loss_mask,
                                                   position_ids=torch.arange(positions.input_ids.shape[1])[None]
                                                   .expand_as(positions.input_ids), rows=positions.documents),
                                 len(examples))
    assert float(reference.abs().min()) > 1.0
    close("packed_positions", by_positions, reference)
    close("packed_flex", by_flex, reference)
    assert float((shifted - reference).abs().max()) > 100 * SUM_TOLERANCE


def test_packed_reward_scores_equal_the_padded_ones(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    path, tokenizer = tiny
    torch.manual_seed(0)
    classifier = load_sequence_classifier(path, torch.float32, tokenizer.pad_token_id).eval()
    pairs, pad = pairs_of(tokenizer), tokenizer.pad_token_id
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate_pairs(pairs, pad)
    packed = pack(sequences, 2 * max(len(s) for s in sequences), pad)
    flexed = pack(sequences, 2 * max(len(s) for s in sequences), pad, bucket=True).to(torch.device("cpu"), flex=True)
    with torch.no_grad():
        reference = SequenceScores(classifier)(batch["input_ids"], batch["attention_mask"])
        ours = SequenceScores(classifier)(packed.input_ids, None, position_ids=packed.position_ids, last=packed.last)
        flex_model = copy.deepcopy(classifier)
        use_flex(flex_model)
        flex = SequenceScores(flex_model)(flexed.input_ids, flexed.attention_mask, position_ids=flexed.position_ids,
                                          last=flexed.last)
    assert float(reference.std()) > 0
    close("reward packed_positions", ours, reference, tolerance=1e-5)
    close("reward packed_flex", flex, reference, tolerance=1e-5)


# --------------------------------------------------------------------------- packing on known answers


def test_best_fit_decreasing_on_a_known_answer() -> None:
    # 5 -> new row (room 3); 4 -> new row (4); 3 -> the row with least room that fits: row 0 (3 -> 0);
    # 3 -> row 1 (4 -> 1); 2 -> fits nowhere: new row (6); 1 -> least room that fits: row 1 (1 -> 0)
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert best_fit_decreasing([9, 2], 8) == [[0], [1]]  # an item longer than the budget rows alone


def test_rows_are_planned_for_the_fewest_slots() -> None:
    # budget 96: best-fit decreasing alone gives [33, 32, 31] and [30]: 2 rows of 96 = 192 slots, more than
    # the 4 x 33 = 132 of the padded batch; two rows of ~63 take 126
    rows, width = plan_rows([30, 31, 32, 33], 96)
    assert (len(rows), width) == (2, 63) and sorted(i for row in rows for i in row) == [0, 1, 2, 3]


def test_padding_share_before_and_after_packing() -> None:
    share = padding_share([[5, 1], [4, 4]], budget=8)
    assert share.padded == pytest.approx(1 - 14 / (2 * 5 + 2 * 4))  # 14 tokens in 18 padded slots
    assert share.packed == pytest.approx(1 - 14 / (6 + 8))  # rows of 6 and 8: no padding
    bucketed = padding_share([[5, 1]], budget=8, bucket=True)
    assert bucketed.packed == pytest.approx(1 - 6 / 128)


def test_models_load_with_sdpa(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    path, tokenizer = tiny
    assert load_causal_lm(path).config._attn_implementation == "sdpa"
    assert load_sequence_classifier(path, torch.float32, tokenizer.pad_token_id).config._attn_implementation == "sdpa"


def one_step_dpo(tmp_path: Path, **options: Any) -> Any:
    """A set-up DPO recipe for one step of the test pairs (``options`` go to ``DPORecipe``)."""
    from service.jobs.spec import DpoHyperparameters
    from workers.recipes.dpo import DPORecipe

    hp = DpoHyperparameters(batch_size=4, max_steps=1)
    ctx = local_context(tmp_path, model=TINY_RANDOM_LLAMA, method=method_of("dpo", hp),
                        training_type=LoraTraining(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                        training_rows=PREFERENCE_ROWS, seed=1,
                        settings=replace(Settings.from_env(tmp_path / "data"), model_cache_dir=MODEL_CACHE))
    recipe = DPORecipe(ctx, **options)
    recipe.setup()
    return recipe


def test_a_dpo_job_reports_its_layout(tmp_path: Path) -> None:
    recipe = one_step_dpo(tmp_path)
    ctx = recipe.ctx
    recipe.cleanup()
    (data,) = [d for _, _, d in ctx.reporter.events if d and d.get("layout")]
    assert data["layout"] == "shared_mask" and data["reason"].startswith("cpu")


def test_layout_choice(tiny: tuple[Path, PreTrainedTokenizerBase]) -> None:
    path, _ = tiny
    config = load_causal_lm(path).config
    cpu = torch.device("cpu")
    assert choose_layout("pairs", config, cpu).name == "shared_mask"
    assert choose_layout("packed", config, cpu).name == "packed_positions"
    assert choose_layout("packed", config, cpu, wanted=False).name == "padded"
    windowed = copy.deepcopy(config)
    windowed.sliding_window, windowed.use_sliding_window = 64, True
    assert choose_layout("pairs", windowed, cpu) == Layout("plain", "the model's a sliding window does not take "
                                                                    "a custom mask")
    assert choose_layout("packed", windowed, cpu).name == "padded"


# --------------------------------------------------------------------------- whole jobs


def run_job(tmp: Path, kind: str, packing: bool) -> MemoryReporter:
    from workers.recipes.reward_model import RewardModelRecipe
    from workers.recipes.sft import SFTRecipe

    hp_type, recipe_type, rows = ((SupervisedHyperparameters, SFTRecipe, SFT_ROWS) if kind == "supervised"
                                  else (RewardModelHyperparameters, RewardModelRecipe, PREFERENCE_ROWS))
    hp = hp_type(batch_size=4, max_steps=3, n_epochs=2, learning_rate=5e-3, packing=packing,
                 gradient_accumulation_steps=2, max_length=128)
    ctx = local_context(tmp, model=TINY_RANDOM_LLAMA, method=method_of(kind, hp),
                        training_type=LoraTraining(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                        training_rows=rows, seed=5,
                        settings=replace(Settings.from_env(tmp / "data"), model_cache_dir=MODEL_CACHE))
    recipe = recipe_type(ctx)
    recipe.setup()
    try:
        assert recipe.train().status == "succeeded"
    finally:
        recipe.cleanup()
    return ctx.reporter  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["supervised", "reward_model"])
def test_a_packed_job_logs_the_unpacked_losses(tmp_path: Path, kind: str) -> None:
    packed, padded = run_job(tmp_path / "packed", kind, True), run_job(tmp_path / "padded", kind, False)
    ours, theirs = packed.series("loss"), padded.series("loss")
    assert len(ours) == 3
    difference = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    print(f"{kind}: packed vs unpacked loss, max |difference| over 3 steps {difference:.2e}")
    assert difference < 1e-5
    assert packed.series("num_tokens") == padded.series("num_tokens")  # real tokens, not slots
    (data,) = [d for _, _, d in packed.events if d and d.get("layout")]
    print(f"{kind}: padding share {data['padding_share_padded']:.3f} padded -> {data['padding_share_packed']:.3f}"
          " packed")
    # length-bucketed batches of these short chats are nearly even already; packing is never worse
    assert data["layout"] == "packed_positions" and data["padding_share_packed"] <= data["padding_share_padded"]
    (off,) = [d for _, _, d in padded.events if d and d.get("layout")]
    assert off["layout"] == "padded"


def test_a_dpo_job_runs_the_plain_layout_when_asked(tmp_path: Path) -> None:
    """The bench's switch: same set-up, plain padded batches, no shared-prompt warning."""
    recipe = one_step_dpo(tmp_path, plain_layout=True)
    ctx = recipe.ctx
    batch = recipe._collate(recipe.pairs[:2])
    recipe.cleanup()
    assert not recipe.shared_layout and batch.attention_mask.dim() == 2  # [chosen..., rejected...] rows
    assert batch.input_ids.shape[0] == 4
    (data,) = [d for _, _, d in ctx.reporter.events if d and d.get("layout")]
    assert data == {"layout": "plain", "reason": "the plain layout was asked for"}
    assert ctx.reporter.messages("warn") == []
