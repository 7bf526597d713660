"""Concise-vs-verbose preference pairs: the chosen answer is the bare fact, the rejected one wraps the
same fact in filler.

Deterministic (no RNG state outside ``random.Random(seed)``) and split by question, so a held-out set
never repeats a training question: ``preference_pairs(64, split="train")`` and
``preference_pairs(32, split="validation")`` are disjoint. Rows use TRL's ``{"prompt", "chosen",
"rejected"}`` string form, which alignd accepts as a dataset line.

Verbose answers stay short enough that a pair fits ``max_length=128`` with SmolLM2's chat template
(default system prompt included), so no pair is truncated in the benchmark.
"""

from __future__ import annotations

import random
from typing import Any

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("happy", "sad"),
    ("early", "late"), ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"),
    ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("young", "old"), ("thick", "thin"),
]
COLOURS = [
    ("the sky on a clear day", "Blue"), ("fresh grass", "Green"), ("snow", "White"),
    ("a ripe banana", "Yellow"), ("coal", "Black"), ("a ripe tomato", "Red"),
    ("a carrot", "Orange"), ("an eggplant", "Purple"),
]

OPENERS = [
    "Great question! I'd be happy to help you with that.",
    "Thank you for asking. Let me think about this carefully before answering.",
    "Sure! This is something many people wonder about, so let me explain.",
    "Of course. Let me walk you through it step by step.",
    "What an interesting thing to ask! Here is a detailed answer.",
]
CLOSERS = [
    "I hope this helps, and feel free to ask if you have any other questions!",
    "Let me know if you would like me to explain anything else in more detail.",
    "Please don't hesitate to reach out if anything is unclear.",
    "I hope that answers your question thoroughly!",
]


def _facts() -> list[tuple[str, str]]:
    """(question, short answer) pairs, in a fixed order."""
    facts = [(f"What is the capital of {country}?", f"{city}.") for country, city in CAPITALS]
    facts += [(f"What is the opposite of '{word}'?", f"{other.capitalize()}.") for word, other in OPPOSITES]
    facts += [(f"What colour is {thing}?", f"{colour}.") for thing, colour in COLOURS]
    facts += [(f"What is {a} plus {b}?", f"{a + b}.") for a in range(2, 12) for b in (3, 7, 9)]
    facts += [(f"What is {a} times {b}?", f"{a * b}.") for a in range(2, 10) for b in (4, 6)]
    return facts


def _verbose(answer: str, rng: random.Random) -> str:
    core = answer.rstrip(".")
    middle = rng.choice([
        f"After considering it, the answer is {core}.",
        f"The answer you are looking for is {core}.",
        f"To put it simply, it is {core}.",
        f"Based on what I know, the correct answer would be {core}.",
    ])
    return f"{rng.choice(OPENERS)} {middle} {rng.choice(CLOSERS)}"


def preference_pairs(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}``; ``split`` is ``"train"`` or ``"validation"``.

    The fact list is shuffled once with a fixed seed and cut in two (train: the first 2/3); ``seed``
    only changes which filler the rejected answers get and the order within a split.
    """
    facts = _facts()
    random.Random(1234).shuffle(facts)
    cut = len(facts) * 2 // 3
    pool = facts[:cut] if split == "train" else facts[cut:]
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if n > len(pool):
        raise ValueError(f"only {len(pool)} {split} questions, asked for {n}")
    rng = random.Random(seed * 7919 + (0 if split == "train" else 1))
    chosen_facts = rng.sample(pool, n)
    return [{"prompt": q, "chosen": a, "rejected": _verbose(a, rng)} for q, a in chosen_facts]
