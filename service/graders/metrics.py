"""``text_similarity`` metrics, each from the field's maintained library (imported on first use).

OpenAI names the metrics but not every setting, so these are alignd's choices, all documented in
docs/reinforcement.md; every score is in [0, 1]:

- ``fuzzy_match``: ``rapidfuzz.fuzz.WRatio(input, reference, processor=utils.default_process) / 100``
  (the guide names rapidfuzz; its own fuzzy Python-grader example is exactly this call).
- ``bleu``: sacrebleu's sentence BLEU (13a tokenizer, exponential smoothing) / 100.
- ``gleu``: Google-BLEU (Wu et al. 2016) from ``nltk.translate.gleu_score.sentence_gleu`` over
  sacrebleu's 13a tokens: min(n-gram precision, recall) for n = 1..4. Needs no NLTK data download.
- ``rouge_1`` … ``rouge_5``, ``rouge_l``: F-measure from Google's ``rouge-score`` (Porter stemming on).

Refused at validation, never approximated: ``meteor`` (needs NLTK's WordNet corpus, which is data,
not code, and cannot ship offline with the package) and ``cosine`` (needs an embedding model;
OpenAI too offers it for evals only, not for fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

UNAVAILABLE: dict[str, str] = {
    "meteor": "evaluation_metric 'meteor' needs NLTK's WordNet corpus, which alignd cannot ship or download; "
              "use bleu, gleu, rouge_* or fuzzy_match, or a python grader",
    "cosine": "evaluation_metric 'cosine' needs an embedding model (OpenAI offers it for evals only, not for "
              "fine-tuning); use fuzzy_match, bleu, gleu or rouge_*, or a score_model grader",
}


def fuzzy_match(hypothesis: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return float(fuzz.WRatio(hypothesis, reference, processor=utils.default_process)) / 100.0


@cache
def _tokenizer() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()  # type: ignore[no-any-return]


def bleu(hypothesis: str, reference: str) -> float:
    from sacrebleu.metrics import BLEU

    return float(_bleu_metric(BLEU).sentence_score(hypothesis, [reference]).score) / 100.0


@cache
def _bleu_metric(cls: Any) -> Any:
    return cls(effective_order=True)


def gleu(hypothesis: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    tokenize = _tokenizer()
    return float(sentence_gleu([tokenize(reference).split()], tokenize(hypothesis).split()))


@cache
def _rouge(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def rouge(kind: str) -> Callable[[str, str], float]:
    def score(hypothesis: str, reference: str) -> float:
        # rouge-score takes (target, prediction)
        return float(_rouge(kind).score(reference, hypothesis)[kind].fmeasure)

    return score


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": rouge("rougeL"),
}


def similarity(metric: str, hypothesis: str, reference: str) -> float:
    """The metric's score of ``hypothesis`` (the grader's ``input``) against ``reference``."""
    if metric in UNAVAILABLE:
        raise ValueError(UNAVAILABLE[metric])
    return METRICS[metric](hypothesis, reference)
