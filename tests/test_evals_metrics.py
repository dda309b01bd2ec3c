"""Metrics against hand-computed values and against rouge-score called directly."""

import math

import pytest
from rouge_score import rouge_scorer

from evals.metrics import (
    METRICS,
    ROUGE_KEYS,
    accuracy,
    exact_match,
    normalize_answer,
    rouge,
    split_sentences,
    squad,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("An apple a day", "apple day"),
        ("  Hello,   World.  ", "hello world"),
        ("theatre and another answer", "theatre and another answer"),  # articles only as whole words
        ("Washington, D.C.", "washington dc"),
        ("\u2018Paris\u2019 \u2014 France", "paris france"),  # curly quotes and an em dash are punctuation
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_ignores_case_punctuation_articles_and_whitespace():
    assert exact_match("  the PARIS. ", ["Paris"]) == {"exact_match": 1.0}
    assert exact_match("Paris France", ["Paris"]) == {"exact_match": 0.0}


def test_exact_match_takes_the_best_gold():
    assert exact_match("Kiev", ["Kyiv", "Kiev"])["exact_match"] == 1.0
    assert exact_match("Lviv", ["Kyiv", "Kiev"])["exact_match"] == 0.0


def test_exact_match_of_empty_answers():
    assert exact_match("", ["the"])["exact_match"] == 1.0  # both normalise to ""
    assert exact_match("", ["Paris"])["exact_match"] == 0.0


def test_token_f1_partial_overlap_by_hand():
    # "cat sat on mat" (4 tokens) vs "cat sat" (2): 2 shared, precision 1/2, recall 1, F1 2/3.
    assert token_f1("the cat sat on the mat", ["a cat sat"])["f1"] == pytest.approx(2 / 3)
    # "barack obama jr" vs "obama": precision 1/3, recall 1, F1 = 2 * (1/3) / (4/3) = 1/2.
    assert token_f1("Barack Obama Jr.", ["Obama"])["f1"] == pytest.approx(0.5)


def test_token_f1_counts_repeated_tokens_once_per_occurrence():
    # "paris paris" vs "paris": 1 shared token, precision 1/2, recall 1.
    assert token_f1("Paris Paris", ["Paris"])["f1"] == pytest.approx(2 / 3)


def test_token_f1_empty_and_disjoint_answers():
    assert token_f1("The", ["an"])["f1"] == 1.0
    assert token_f1("", ["Paris"])["f1"] == 0.0
    assert token_f1("Paris", [""])["f1"] == 0.0
    assert token_f1("Rome", ["Paris"])["f1"] == 0.0


def test_token_f1_takes_the_best_gold():
    # vs "London": 0; vs "Paris France": precision 1, recall 1/2, F1 2/3.
    assert token_f1("Paris", ["London", "Paris France"])["f1"] == pytest.approx(2 / 3)


def test_squad_reports_both_scores():
    assert squad("the cat sat on the mat", ["a cat sat"]) == {"exact_match": 0.0, "f1": pytest.approx(2 / 3)}


def test_metrics_reject_missing_or_misshapen_golds():
    with pytest.raises(ValueError):
        token_f1("Paris", [])
    with pytest.raises(TypeError):
        exact_match("Paris", "Paris")  # a bare string would be read as a list of characters


def test_accuracy_finds_the_gold_as_whole_words():
    assert accuracy("Paris, France", ["Paris"]) == {"accuracy": 1.0}
    assert accuracy("It is Washington D.C. of course", ["Washington, D.C."]) == {"accuracy": 1.0}
    assert accuracy("Parisian", ["Paris"]) == {"accuracy": 0.0}
    assert accuracy("Madrid", ["Paris", "Madrid"]) == {"accuracy": 1.0}


def test_split_sentences():
    text = "First one. Second one!  Third?\nFourth line\n\nFifth"
    assert split_sentences(text) == ["First one.", "Second one!", "Third?", "Fourth line", "Fifth"]
    assert split_sentences("   ") == []


PREDICTION = "The cat sat on the mat. It was happy! Then it slept near the fire."
REFERENCE = "A cat was sitting on the mat. The cat slept by the fire. It was happy."


def test_rouge_matches_rouge_score_called_directly():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    plain = scorer.score(REFERENCE, PREDICTION)
    by_line = scorer.score(
        "A cat was sitting on the mat.\nThe cat slept by the fire.\nIt was happy.",
        "The cat sat on the mat.\nIt was happy!\nThen it slept near the fire.",
    )
    ours = rouge(PREDICTION, [REFERENCE])
    assert set(ours) == set(ROUGE_KEYS)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(plain[key].fmeasure)
    assert ours["rougeLsum"] == pytest.approx(by_line["rougeLsum"].fmeasure)
    # Without sentence splitting Lsum would equal L; these texts tell the two apart.
    assert not math.isclose(by_line["rougeLsum"].fmeasure, plain["rougeL"].fmeasure)


def test_rouge_uses_stemming():
    assert rouge("the cats were running", ["the cat was run"])["rouge1"] > rouge(
        "the dogs were walking", ["the cat was run"])["rouge1"]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    assert rouge("cats running", ["cat runs"])["rouge1"] == pytest.approx(
        scorer.score("cat runs", "cats running")["rouge1"].fmeasure) == pytest.approx(1.0)


def test_rouge_takes_the_best_reference_per_key():
    best = rouge(PREDICTION, ["Stock markets fell sharply.", REFERENCE])
    assert best == pytest.approx(rouge(PREDICTION, [REFERENCE]))


def test_rouge_of_identical_and_empty_texts():
    assert rouge(REFERENCE, [REFERENCE]) == pytest.approx(dict.fromkeys(ROUGE_KEYS, 1.0))
    assert rouge("", [REFERENCE]) == dict.fromkeys(ROUGE_KEYS, 0.0)


def test_registry_names_every_metric():
    assert METRICS == {"exact_match": exact_match, "f1": token_f1, "squad": squad, "accuracy": accuracy,
                       "rouge": rouge}
    for metric in METRICS.values():
        scores = metric("New Delhi", ["New Delhi"])  # two words, so ROUGE-2 has a bigram
        assert scores and all(value == pytest.approx(1.0) for value in scores.values())
