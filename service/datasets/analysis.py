"""What is in an uploaded dataset, and which method fits it: the file object's ``analysis``.

Computed once at upload, after validation, in one streaming pass that holds one line at a time plus
an 8-byte hash per distinct prompt. Pure standard library, like :mod:`service.datasets.validation`:
the API never loads a tokenizer, so token counts here are an estimate (``ceil(chars / 4)`` per
message, the usual rule of thumb for English BPE vocabularies); exact counts need the base model's
tokenizer, which only workers load.

What it reports (every share is a fraction of the analysed examples, rounded to 4 places):

- ``format``, ``variant``, ``examples`` and ``tokens`` (estimated totals, mean and max per example).
- ``turns``: user turns per example (mean, max) and how many examples are multi-turn.
- ``duplicate_prompts``: examples whose prompt (roles and whitespace-collapsed text of every turn
  before the completion) already appeared earlier in the file.
- ``preference`` (pairs only), the biases preference data is known for:
  ``chosen_longer_share`` (chosen has more characters than rejected), ``mean_length_ratio`` (mean
  of chosen chars / rejected chars), ``identical_prefix_share`` (both answers start with the same
  first ``prefix_words`` words, or all words of the shorter answer when it has fewer),
  ``near_duplicate_pairs`` (token-set Jaccard of chosen and rejected >= 0.9) and
  ``factual_share`` (the prompt is a who/what/when/where/which/how-many question and the chosen
  answer has words the rejected one lacks, i.e. the two answers disagree on content, not style).
- ``reinforcement`` (RFT lines only): ``fields``, how many lines carry each extra top-level field
  (what graders read as ``{{item.<field>}}``); a field missing from some lines is named in a warning,
  because a job whose grader reads it is refused.
- ``recommendation``: ``{method, reasons, warnings}`` from the decision guide in
  ``docs/choosing-a-method.md``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from service.datasets.validation import (
    _chunks,
    _Invalid,
    _lines,
    _parse_line,
    detect_kind,
)

CHARS_PER_TOKEN = 4
PREFIX_WORDS = 5
NEAR_DUPLICATE_JACCARD = 0.9
FEW_PAIRS = 200
LENGTH_BIAS_HIGH = 0.8
LENGTH_BIAS_LOW = 0.2
DUPLICATE_WARN_SHARE = 0.1
TOKEN_ESTIMATE = "ceil(chars/4) per message"

_WORD = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s+")
_FACTUAL_START = re.compile(
    r"^\s*(who|whom|whose|what|when|where|which|how (many|much|long|far|old|tall|big))\b", re.IGNORECASE)
_SCORE_KEYS = ("score", "reward")
_PROMPT_KEYS = frozenset({"messages", "id", "metadata"})
MAX_FIELDS = 100

Message = dict[str, Any]


def approx_tokens(text: str) -> int:
    """Estimated tokens of one text: ``ceil(chars / 4)``."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two texts (lower-cased ``\\w+`` words); 1.0 for two empty texts."""
    sa, sb = set(words(a)), set(words(b))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def same_prefix(a: str, b: str, n: int = PREFIX_WORDS) -> bool:
    """Both texts start with the same first ``n`` words (fewer when one text is shorter than ``n``)."""
    wa, wb = words(a), words(b)
    k = min(n, len(wa), len(wb))
    return k > 0 and wa[:k] == wb[:k]


def is_factual_question(text: str) -> bool:
    return text.rstrip().endswith("?") and bool(_FACTUAL_START.match(text))


@dataclass
class _Example:
    prompt: list[Message]
    completion: str = ""
    rejected: str | None = None
    has_margin: bool = False
    score: float | None = None


def _content(messages: list[Message]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages)


def _shared_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    limit = min(len(chosen), len(rejected)) - 1
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _score(row: dict[str, Any]) -> float | None:
    metadata = row.get("metadata")
    if isinstance(metadata, dict):
        for key in _SCORE_KEYS:
            value = metadata.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
    return None


def _example(row: dict[str, Any], variant: str) -> _Example:
    """The prompt and completion(s) of one valid line (validation has already checked its shape)."""
    score = _score(row)
    if variant == "openai_preference":
        return _Example(row["input"]["messages"], row["preferred_output"][0]["content"],
                        row["non_preferred_output"][0]["content"], "margin" in row, score)
    if variant == "trl_preference":
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if isinstance(prompt, str):
            return _Example([{"role": "user", "content": prompt}], chosen, rejected, "margin" in row, score)
        if isinstance(prompt, list):
            return _Example(prompt, _content(chosen), _content(rejected), "margin" in row, score)
        shared = _shared_prefix(chosen, rejected)
        return _Example(chosen[:shared], _content(chosen[shared:]), _content(rejected[shared:]),
                        "margin" in row, score)
    if variant == "messages":
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            return _Example(messages[:-1], messages[-1]["content"], score=score)
        return _Example(messages, score=score)
    if variant == "prompt_completion":
        return _Example([{"role": "user", "content": row["prompt"]}], row["completion"], score=score)
    return _Example([{"role": "user", "content": row["prompt"]}], score=score)


def _prompt_key(prompt: list[Message]) -> bytes:
    text = "\x1f".join(f"{m['role']}\x1e{_SPACE.sub(' ', str(m['content'])).strip()}" for m in prompt)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def _mean(total: float, count: int, digits: int = 2) -> float:
    return round(total / count, digits) if count else 0.0


@dataclass
class _Stats:
    kind: str | None
    variant: str | None
    examples: int = 0
    tokens_total: int = 0
    tokens_prompt: int = 0
    tokens_completion: int = 0
    tokens_max: int = 0
    turns_total: int = 0
    turns_max: int = 0
    multi_turn: int = 0
    seen_prompts: set[bytes] = field(default_factory=set)
    duplicate_prompts: int = 0
    scored: int = 0
    # preference pairs
    chosen_longer: int = 0
    rejected_longer: int = 0
    ratio_sum: float = 0.0
    chosen_chars: int = 0
    rejected_chars: int = 0
    identical_prefix: int = 0
    near_duplicates: int = 0
    with_margin: int = 0
    factual: int = 0
    # reinforcement lines: extra field -> lines that carry it
    fields: dict[str, int] = field(default_factory=dict)

    def add_fields(self, row: dict[str, Any]) -> None:
        for key in row:
            if key not in _PROMPT_KEYS and len(self.fields) < MAX_FIELDS or key in self.fields:
                self.fields[key] = self.fields.get(key, 0) + 1

    def add(self, ex: _Example) -> None:
        self.examples += 1
        prompt_tokens = sum(approx_tokens(str(m["content"])) for m in ex.prompt)
        completion_tokens = approx_tokens(ex.completion)
        if ex.rejected is not None:
            completion_tokens += approx_tokens(ex.rejected)
        total = prompt_tokens + completion_tokens
        self.tokens_prompt += prompt_tokens
        self.tokens_completion += completion_tokens
        self.tokens_total += total
        self.tokens_max = max(self.tokens_max, total)
        turns = sum(1 for m in ex.prompt if m["role"] == "user")
        self.turns_total += turns
        self.turns_max = max(self.turns_max, turns)
        self.multi_turn += turns > 1
        key = _prompt_key(ex.prompt)
        if key in self.seen_prompts:
            self.duplicate_prompts += 1
        else:
            self.seen_prompts.add(key)
        self.scored += ex.score is not None
        if ex.rejected is not None:
            self._add_pair(ex)

    def _add_pair(self, ex: _Example) -> None:
        chosen, rejected = ex.completion, ex.rejected or ""
        self.chosen_chars += len(chosen)
        self.rejected_chars += len(rejected)
        self.chosen_longer += len(chosen) > len(rejected)
        self.rejected_longer += len(rejected) > len(chosen)
        self.ratio_sum += len(chosen) / max(len(rejected), 1)
        self.identical_prefix += same_prefix(chosen, rejected)
        self.near_duplicates += jaccard(chosen, rejected) >= NEAR_DUPLICATE_JACCARD
        self.with_margin += ex.has_margin
        last_user = next((str(m["content"]) for m in reversed(ex.prompt) if m["role"] == "user"), "")
        self.factual += is_factual_question(last_user) and not set(words(chosen)) <= set(words(rejected))

    def to_dict(self) -> dict[str, Any]:
        n = self.examples
        out: dict[str, Any] = {
            "format": self.kind,
            "variant": self.variant,
            "examples": n,
            "tokens": {
                "estimate": TOKEN_ESTIMATE,
                "total": self.tokens_total,
                "prompt": self.tokens_prompt,
                "completion": self.tokens_completion,
                "mean_per_example": _mean(self.tokens_total, n),
                "max_per_example": self.tokens_max,
            },
            "turns": {
                "mean": _mean(self.turns_total, n),
                "max": self.turns_max,
                "multi_turn_examples": self.multi_turn,
                "multi_turn_share": _share(self.multi_turn, n),
            },
            "duplicate_prompts": {
                "count": self.duplicate_prompts,
                "share": _share(self.duplicate_prompts, n),
                "unique_prompts": len(self.seen_prompts),
            },
            "scored_examples": self.scored,
        }
        if self.kind == "preference":
            out["preference"] = {
                "pairs": n,
                "chosen_longer": self.chosen_longer,
                "chosen_longer_share": _share(self.chosen_longer, n),
                "rejected_longer": self.rejected_longer,
                "mean_length_ratio": _mean(self.ratio_sum, n, 4),
                "mean_chosen_chars": _mean(self.chosen_chars, n),
                "mean_rejected_chars": _mean(self.rejected_chars, n),
                "prefix_words": PREFIX_WORDS,
                "identical_prefix": self.identical_prefix,
                "identical_prefix_share": _share(self.identical_prefix, n),
                "near_duplicate_threshold": NEAR_DUPLICATE_JACCARD,
                "near_duplicate_pairs": self.near_duplicates,
                "near_duplicate_share": _share(self.near_duplicates, n),
                "with_margin": self.with_margin,
                "factual_share": _share(self.factual, n),
            }
        if self.kind == "reinforcement":
            out["reinforcement"] = {"fields": dict(sorted(self.fields.items()))}
        out["recommendation"] = recommend(out)
        return out


def recommend(analysis: dict[str, Any]) -> dict[str, Any]:
    """The decision guide (docs/choosing-a-method.md) applied to an analysis: ``{method, reasons, warnings}``.

    ``method`` is a ``method.type`` (``dpo``, ``supervised``, ``reward_model``, ``ppo``, ``reinforcement``) or
    ``collect_more`` when the data cannot carry what the task needs.
    """
    kind, n = analysis["format"], analysis["examples"]
    reasons: list[str] = []
    warnings: list[str] = []
    multi = analysis["turns"]["multi_turn_share"]
    dup = analysis["duplicate_prompts"]
    if n == 0:
        return {"method": None, "reasons": ["the file has no valid example to analyse"], "warnings": []}
    if dup["share"] > DUPLICATE_WARN_SHARE:
        warnings.append(f"{dup['count']} of {n} examples ({dup['share']:.0%}) repeat an earlier prompt; "
                        "duplicates weigh those prompts more and leak between training and validation splits")
    method: str
    if kind == "preference":
        pref = analysis["preference"]
        if n < FEW_PAIRS and pref["factual_share"] >= 0.5:
            method = "collect_more"
            reasons.append(f"only {n} pairs, and {pref['factual_share']:.0%} are factual questions whose "
                           "preferred answer differs in content from the rejected one: preference tuning on "
                           f"fewer than ~{FEW_PAIRS} pairs shifts style, it does not teach facts")
            reasons.append("collect more pairs (or train the correct answers with supervised fine-tuning "
                           "first), then run DPO")
        elif multi > 0.5:
            method = "dpo"
            reasons.append(f"{multi:.0%} of pairs are multi-turn: DPO with final-turn masking (earlier turns "
                           "are context, only the final assistant answer enters the log-ratio)")
            reasons.append("if whole conversations can be scored instead, train a reward model and use PPO")
        else:
            method = "dpo"
            reasons.append("preference pairs with single-turn prompts: DPO (no reward model and no sampling; "
                           "the most stable and cheapest preference method)")
            if n < FEW_PAIRS:
                reasons.append(f"only {n} pairs: enough to shift style or tone; expect noisy results for "
                               "anything else")
        if pref["with_margin"]:
            reasons.append(f"{pref['with_margin']} pairs carry a margin: a reward_model job uses it "
                           "(a reward model plus PPO is the alternative to DPO)")
        share = pref["chosen_longer_share"]
        if share > LENGTH_BIAS_HIGH or share < LENGTH_BIAS_LOW:
            longer = "longer" if share > LENGTH_BIAS_HIGH else "shorter"
            part = share if share > LENGTH_BIAS_HIGH else 1 - share
            warnings.append(f"length bias: the chosen answer is {longer} in {part:.0%} of pairs; the model "
                            f"will learn to answer {longer} whatever else the pairs say (intended?)")
        if pref["near_duplicate_share"] > DUPLICATE_WARN_SHARE:
            warnings.append(f"{pref['near_duplicate_pairs']} pairs have nearly identical chosen and "
                            f"rejected answers (word-set Jaccard >= {NEAR_DUPLICATE_JACCARD}); they carry "
                            "little signal")
        if pref["identical_prefix_share"] > 0.5:
            warnings.append(f"{pref['identical_prefix_share']:.0%} of pairs start with the same "
                            f"{PREFIX_WORDS} words; the shared prefix carries no preference signal")
    elif kind == "supervised":
        if analysis["scored_examples"] > n / 2:
            method = "reward_model"
            reasons.append("examples carry scalar per-episode scores (metadata.score or metadata.reward): "
                           "pair higher- over lower-scored answers to the same prompt to train a reward "
                           "model, then optimise the policy against it with PPO")
        else:
            method = "supervised"
            reasons.append("demonstrations without preferences: supervised fine-tuning")
            if multi > 0:
                reasons.append(f"{multi:.0%} of examples are multi-turn: every weighted assistant turn is "
                               "trained (set weight 0 on turns that should stay context)")
    elif kind == "reinforcement":
        method = "reinforcement"
        fields = analysis.get("reinforcement", {}).get("fields", {})
        named = ", ".join(fields) or "none"
        reasons.append(f"prompts with reference fields ({named}): reinforcement fine-tuning with a grader that "
                       "reads them as {{item.<field>}} (docs/reinforcement.md)")
        partial = [f"{name} ({count} of {n})" for name, count in fields.items() if count < n]
        if partial:
            warnings.append("some lines lack a field: " + ", ".join(partial) + "; a job whose grader reads "
                            "a missing field is refused at creation")
    else:
        method = "ppo"
        reasons.append("prompts only: PPO samples answers and needs a reward model (a succeeded "
                       "reward_model job's fine_tuned_model as hyperparameters.reward_model), or "
                       "reinforcement fine-tuning with a grader")
    return {"method": method, "reasons": reasons, "warnings": warnings}


def analyze_jsonl(source: BinaryIO | Iterable[bytes], *, kind: str | None = None, variant: str | None = None,
                  max_line_bytes: int = 4 << 20, max_depth: int = 32) -> dict[str, Any]:
    """Analyse a JSONL file; only valid lines of the file's ``kind``/``variant`` count.

    With ``kind`` and ``variant`` unset, the first valid line sets them (as validation does).
    """
    stats = _Stats(kind, variant)
    for _, raw, _ in _lines(_chunks(source), max_line_bytes):
        if raw is None or not raw.strip():
            continue
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            row = _parse_line(raw, max_depth, 0)
        except _Invalid:
            continue
        detected = detect_kind(row)
        if detected is None:
            continue
        if stats.kind is None:
            stats.kind, stats.variant = detected[0].value, detected[1]
        rft_line = stats.kind == "reinforcement" and detected[1] == "messages" and detected[0].value in (
            "reinforcement", "prompts")
        if (detected[0].value, detected[1]) != (stats.kind, stats.variant) and not rft_line:
            continue
        if stats.kind == "reinforcement":
            stats.add_fields(row)
        stats.add(_example(row, detected[1]))
    return stats.to_dict()
