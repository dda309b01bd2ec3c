"""Answer-quality metrics: SQuAD-style exact match and token F1, a lenient accuracy, and ROUGE.

Every metric has the same signature, `metric(prediction, golds) -> dict[str, float]`, so a task can
name its metric by string (`METRICS["squad"]`) and a sweep can store whatever keys come back. `golds`
holds every accepted answer (aliases included); QA metrics take the best score over them.

QA answers are compared after SQuAD normalisation: lowercase, drop punctuation, drop the articles
"a", "an" and "the", collapse whitespace. Diacritics are kept (as in SQuAD), so a task that wants
"Bogota" to match "Bogotá" lists both spellings among its golds.

ROUGE comes from Google's `rouge-score` package with Porter stemming. ROUGE-Lsum needs one sentence
per line, so prediction and reference are split into sentences first (`split_sentences`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(char: str) -> bool:
    # ASCII punctuation as in SQuAD, plus Unicode punctuation (curly quotes, dashes) that models emit.
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    text = text.lower()
    text = "".join(char for char in text if not _is_punctuation(char))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _require_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str):
        raise TypeError("golds must be a sequence of answer strings, not a single string")
    if not golds:
        raise ValueError("at least one gold answer is needed to score a prediction")


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not predicted_tokens or not gold_tokens:
        # Two empty answers agree perfectly; an empty answer against a non-empty one shares nothing.
        return float(predicted_tokens == gold_tokens)
    shared = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    _require_golds(golds)
    predicted = normalize_answer(prediction)
    return {"exact_match": float(any(predicted == normalize_answer(gold) for gold in golds))}


def token_f1(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Harmonic mean of token precision and recall after normalisation, best over the gold answers."""
    _require_golds(golds)
    return {"f1": max(_token_f1(prediction, gold) for gold in golds)}


def squad(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 together, the usual pair reported for extractive and factoid QA."""
    return exact_match(prediction, golds) | token_f1(prediction, golds)


def accuracy(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """1.0 if some normalised gold answer occurs as a run of whole words inside the normalised prediction.

    More lenient than exact match: "Paris, France" counts as a correct answer for "Paris", but
    "Parisian" does not. Useful when a model adds words around a correct answer, and for the swap
    experiment, which asks whether the original or the injected answer was produced.
    """
    _require_golds(golds)
    predicted = f" {normalize_answer(prediction)} "
    for gold in golds:
        normalised_gold = normalize_answer(gold)
        if normalised_gold and f" {normalised_gold} " in predicted:
            return {"accuracy": 1.0}
    return {"accuracy": 0.0}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at line breaks and at whitespace after '.', '!' or '?'.

    Deliberately simple (an abbreviation such as "Dr." also ends a sentence); it only decides where
    ROUGE-Lsum may start a new longest common subsequence, so rare mistakes move scores very little.
    """
    return [sentence.strip() for sentence in _SENTENCE_END.split(text) if sentence.strip()]


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures with stemming; each key takes its best value over the references.

    Both texts are rewritten one sentence per line, which is what ROUGE-Lsum expects; the other three
    variants tokenise on non-alphanumerics, so the line breaks do not change them.
    """
    _require_golds(golds)
    prediction_lines = "\n".join(split_sentences(prediction))
    best = dict.fromkeys(ROUGE_KEYS, 0.0)
    for gold in golds:
        # rouge-score's argument order is (target, prediction).
        scores = _rouge_scorer().score("\n".join(split_sentences(gold)), prediction_lines)
        for key in ROUGE_KEYS:
            best[key] = max(best[key], scores[key].fmeasure)
    return best


Metric = Callable[[str, Sequence[str]], dict[str, float]]

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "squad": squad,
    "accuracy": accuracy,
    "rouge": rouge,
}
