"""The shared tokenization path: normalisation, masks, truncation, collation and bucketing."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase  # noqa: E402

from service.settings import Settings  # noqa: E402
from workers.base_models import TINY_RANDOM_LLAMA, load_tokenizer, resolve_base_model  # noqa: E402
from workers.batching import collate_pairs, collate_supervised, length_bucketed_batches  # noqa: E402
from workers.data import (  # noqa: E402
    ChatTemplateError,
    PreferencePair,
    encode_segments,
    normalize_preference,
    normalize_supervised,
    tokenize_preference,
    tokenize_supervised,
)

IM_END = "<|im_end|>"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-random-llama in the session's shared cache (test_base_models.py uses the same one)."""
    cache = tmp_path_factory.getbasetemp() / "alignd-model-cache"
    settings = replace(Settings.from_env(cache.parent / "alignd-data"), model_cache_dir=cache, models={})
    return resolve_base_model(TINY_RANDOM_LLAMA, settings)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def trained_spans(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans: list[list[int]] = []
    for position, (token, keep) in enumerate(zip(ids, mask, strict=True)):
        if keep:
            if position == 0 or not mask[position - 1]:
                spans.append([])
            spans[-1].append(token)
    return [str(tokenizer.decode(span)) for span in spans]


def qa_pair(prompt: str = "What is 2+2?", good: str = "4", bad: str = "5") -> PreferencePair:
    return normalize_preference({"prompt": prompt, "chosen": good, "rejected": bad})


# --------------------------------------------------------------------------- supervised


def test_supervised_mask_token_by_token(tokenizer: PreTrainedTokenizerBase) -> None:
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": "Say no"},
            {"role": "assistant", "content": "No.", "weight": 0},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    tokenized = tokenize_supervised(normalize_supervised(example), tokenizer, max_length=512)
    assert tokenized is not None and not tokenized.truncated

    pieces = [  # (ChatML text, trained?) written out by hand
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n", 0),
        ("<|im_start|>assistant\n", 0),
        ("Hello there!<|im_end|>", 1),
        ("\n<|im_start|>user\nSay no<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n", 0),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("4<|im_end|>", 1),
    ]
    expected_ids: list[int] = []
    expected_mask: list[int] = []
    for text, trained in pieces:
        ids = encode(tokenizer, text)
        expected_ids += ids
        expected_mask += [trained] * len(ids)
    assert tokenized.input_ids == expected_ids
    assert tokenized.loss_mask == expected_mask
    assert trained_spans(tokenizer, tokenized.input_ids, tokenized.loss_mask) == [
        "Hello there!<|im_end|>",
        "4<|im_end|>",
    ]
    assert tokenized.labels == [t if m else -100 for t, m in zip(expected_ids, expected_mask, strict=True)]


def test_prompt_completion_format_is_a_two_turn_chat(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = normalize_supervised({"prompt": "Capital of France?", "completion": "Paris"})
    assert messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    tokenized = tokenize_supervised(messages, tokenizer, 512)
    assert tokenized is not None
    assert trained_spans(tokenizer, tokenized.input_ids, tokenized.loss_mask) == ["Paris<|im_end|>"]


def test_no_doubled_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    supervised = tokenize_supervised(
        normalize_supervised({"prompt": "Hi", "completion": "Hello"}), tokenizer, 512
    )
    assert supervised is not None
    assert supervised.input_ids[-1] == im_end
    assert supervised.input_ids.count(im_end) == 3  # default system, user, assistant: one each

    pair = tokenize_preference(qa_pair(), tokenizer, 512)
    assert pair is not None
    for side, text in ((pair.chosen, "4"), (pair.rejected, "5")):
        completion = [t for t, m in zip(side.input_ids, side.completion_mask, strict=True) if m]
        assert completion == encode(tokenizer, text) + [im_end]
        assert side.input_ids[-1] == im_end and side.input_ids.count(im_end) == 3


def test_nothing_trainable_gives_none(tokenizer: PreTrainedTokenizerBase) -> None:
    only_context = normalize_supervised(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}
    )
    assert tokenize_supervised(only_context, tokenizer, 512) is None
    long_question = normalize_supervised({"prompt": "word " * 200, "completion": "ok"})
    assert tokenize_supervised(long_question, tokenizer, 32) is None


def test_supervised_is_cut_on_the_right(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = normalize_supervised({"prompt": "Hi", "completion": "one two three " * 20})
    full = tokenize_supervised(messages, tokenizer, 4096)
    cut = tokenize_supervised(messages, tokenizer, 40)
    assert full is not None and cut is not None
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:40] and cut.loss_mask == full.loss_mask[:40]


# --------------------------------------------------------------------------- preference formats


def test_openai_preference_format() -> None:
    pair = normalize_preference(
        {
            "input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
            "preferred_output": [{"role": "assistant", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        }
    )
    assert pair == PreferencePair(
        prompt=[{"role": "user", "content": "Hi"}],
        chosen=[{"role": "assistant", "content": "Hello!"}],
        rejected=[{"role": "assistant", "content": "Go away."}],
        margin=None,
    )


def test_trl_explicit_prompt_formats() -> None:
    strings = normalize_preference({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2})
    assert strings.prompt == [{"role": "user", "content": "Q"}]
    assert strings.chosen == [{"role": "assistant", "content": "good"}]
    assert strings.margin == 2.0
    messages = normalize_preference(
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    )
    assert [m["role"] for m in messages.prompt] == ["system", "user"]


def test_trl_implicit_prompt_is_the_shared_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    pair = normalize_preference(
        {
            "chosen": [*history, {"role": "assistant", "content": "4"}],
            "rejected": [*history, {"role": "assistant", "content": "22"}],
        }
    )
    assert pair.prompt == history
    assert pair.chosen == [{"role": "assistant", "content": "4"}]
    assert pair.rejected == [{"role": "assistant", "content": "22"}]

    tokenized = tokenize_preference(pair, tokenizer, 512)
    assert tokenized is not None and not tokenized.truncated
    prompt_text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    prompt_ids = encode(tokenizer, str(prompt_text))
    for side, text in ((tokenized.chosen, "4"), (tokenized.rejected, "22")):
        assert side.input_ids[: len(prompt_ids)] == prompt_ids
        assert side.completion_mask == [0] * len(prompt_ids) + [1] * (len(side) - len(prompt_ids))
        assert tokenizer.decode(side.input_ids[len(prompt_ids) :]) == text + IM_END


@pytest.mark.parametrize(
    "example",
    [
        {"chosen": "a", "rejected": "b"},  # strings carry no implicit prompt
        {"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
        {"prompt": "Q", "chosen": [{"role": "user", "content": "not an answer"}], "rejected": "b"},
        {"prompt": "Q", "chosen": [{"role": "robot", "content": "?"}], "rejected": "b"},
        {"text": "nothing"},
    ],
)
def test_invalid_preference_examples_are_refused(example: dict) -> None:
    with pytest.raises(ValueError):
        normalize_preference(example)


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_completion(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = qa_pair(prompt="background " * 100 + "so, what is 2+2?", good="It is 4.", bad="Five")
    full = tokenize_preference(pair, tokenizer, 4096)
    cut = tokenize_preference(pair, tokenizer, 48)
    assert full is not None and cut is not None
    assert not full.truncated and cut.truncated
    for whole, short in ((full.chosen, cut.chosen), (full.rejected, cut.rejected)):
        assert len(short) <= 48
        completion = sum(whole.completion_mask)
        assert short.input_ids[-completion:] == whole.input_ids[-completion:]  # completion intact
        assert sum(short.completion_mask) == completion
        assert whole.input_ids[-len(short) :] == short.input_ids  # the prompt lost its left end
    # Both sides see the same prompt window.
    chosen_prompt = cut.chosen.input_ids[: len(cut.chosen) - sum(cut.chosen.completion_mask)]
    rejected_prompt = cut.rejected.input_ids[: len(cut.rejected) - sum(cut.rejected.completion_mask)]
    assert chosen_prompt == rejected_prompt


def test_overlong_completion_is_cut_at_its_end(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = qa_pair(good="yes " * 100, bad="no")
    cut = tokenize_preference(pair, tokenizer, 64)
    full = tokenize_preference(pair, tokenizer, 4096)
    assert cut is not None and full is not None and cut.truncated
    assert len(cut.chosen) == 64
    kept_prompt = len(cut.chosen) - sum(cut.chosen.completion_mask)
    assert kept_prompt == 16  # MIN_PROMPT_TOKENS: the assistant header and the question's end
    full_prompt = len(full.chosen) - sum(full.chosen.completion_mask)
    assert cut.chosen.input_ids == full.chosen.input_ids[full_prompt - kept_prompt :][:64]
    assert cut.chosen.input_ids[kept_prompt - 4 : kept_prompt] == encode(tokenizer, "<|im_start|>assistant\n")


# --------------------------------------------------------------------------- template diffing


def test_segments_fall_back_when_a_merge_straddles_a_boundary(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = ["Hel", "Hello world"]
    assert encode(tokenizer, "Hello world")[:1] != encode(tokenizer, "Hel")  # the merge we guard against
    pieces = encode_segments(tokenizer, texts)
    assert pieces == [encode(tokenizer, "Hel"), encode(tokenizer, "lo world")]
    aligned = encode_segments(tokenizer, ["Hello", "Hello world"])
    assert sum(aligned, []) == encode(tokenizer, "Hello world")
    with pytest.raises(ChatTemplateError):
        encode_segments(tokenizer, ["abc", "abd"])


# --------------------------------------------------------------------------- collation


def test_collate_pairs_layout(tokenizer: PreTrainedTokenizerBase) -> None:
    pairs = [
        tokenize_preference(qa_pair(good="4", bad="five hundred"), tokenizer, 512),
        tokenize_preference(replace(qa_pair(prompt="Longer question here?"), margin=1.5), tokenizer, 512),
    ]
    assert all(pair is not None for pair in pairs)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)  # type: ignore[arg-type]
    rows = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]  # type: ignore[union-attr]
    width = max(len(seq) for seq in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (4, width)
    for row, seq in enumerate(rows):
        n = len(seq)
        assert batch["input_ids"][row, :n].tolist() == seq.input_ids
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["loss_mask"][row].tolist() == seq.completion_mask + [0] * (width - n)
    assert batch["margin"].tolist() == [0.0, 1.5]
    assert "margin" not in collate_pairs(pairs[:1], tokenizer.pad_token_id)  # type: ignore[arg-type]


def test_loss_mask_convention_matches_hf_labels(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    """loss_mask marks targets at their own index; logits at t-1 predict them (as HF labels do)."""
    examples = [
        tokenize_supervised(normalize_supervised({"prompt": p, "completion": c}), tokenizer, 512)
        for p, c in (("Hi", "Hello!"), ("Name a colour.", "Blue, probably."))
    ]
    batch = collate_supervised(examples, tokenizer.pad_token_id)  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        out = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels")})
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:].float()
    manual = -(token_logp * mask).sum() / mask.sum()
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert batch["loss_mask"][:, 0].eq(0).all()


# --------------------------------------------------------------------------- bucketing


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_bucketing() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(5, 800) for _ in range(1003)]
    batches = length_bucketed_batches(lengths, batch_size=8, seed=3)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert sum(len(b) < 8 for b in batches) == 1  # only one partial batch

    shuffled = list(range(len(lengths)))
    random.Random(3).shuffle(shuffled)
    random_batches = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    assert padding(lengths, batches) < padding(lengths, random_batches) / 4

    assert length_bucketed_batches(lengths, 8, seed=3) == batches  # deterministic
    assert length_bucketed_batches(lengths, 8, seed=4) != batches  # but seed-dependent
    ordered = length_bucketed_batches(lengths, 8, seed=0, shuffle=False)
    assert sorted(i for b in ordered for i in b) == list(range(len(lengths)))
    assert lengths[ordered[0][0]] == max(lengths)  # evaluation: longest batch first
    assert length_bucketed_batches([], 8, seed=0) == []
