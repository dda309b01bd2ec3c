"""The intervals every shown score carries (evals.stats), checked against hand computation and by simulation.

Wilson is compared with its closed form written another way; the bootstraps and Newcombe's paired
interval are checked by what they promise: about 95% coverage of a known mean on simulated data,
and the same bytes for the same seed.
"""

from __future__ import annotations

import math
import random

import pytest

from evals.stats import Z95, bootstrap_mean, interval, newcombe_paired, paired_bootstrap, paired_difference, wilson


def wilson_by_hand(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(2np + z^2 -+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)): the same interval, rearranged."""
    p = successes / n
    root = z * math.sqrt(z * z + 4 * n * p * (1 - p))
    return (2 * n * p + z * z - root) / (2 * (n + z * z)), (2 * n * p + z * z + root) / (2 * (n + z * z))


@pytest.mark.parametrize("successes, n", [(0, 10), (1, 10), (8, 10), (10, 10), (13, 40), (81, 263)])
def test_wilson_matches_the_closed_form(successes, n):
    assert wilson(successes, n) == pytest.approx(wilson_by_hand(successes, n), abs=1e-12)


def test_wilson_known_values():
    # 0 of n: the upper bound is z^2 / (n + z^2); 1.96^2 = 3.8415 -> 3.8415 / 13.8415 = 0.2775 for n = 10
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = wilson(5, 10)  # symmetric about 1/2: 0.5 -+ 1.96/(1+0.38415) * sqrt(0.025 + 0.0096) = 0.2366, 0.7634
    assert (lo, hi) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_interval_uses_wilson_for_0_1_scores_and_the_bootstrap_otherwise():
    assert interval([1.0, 0.0, 1.0, 1.0], binary=True) == wilson(3, 4)
    graded = [0.5, 0.25, 1.0, 0.0, 0.75]
    assert interval(graded, binary=False) == bootstrap_mean(graded)
    assert interval([0.0, 1.0], binary=False) == bootstrap_mean([0.0, 1.0])  # ROUGE of 0 and 1 is still graded
    with pytest.raises(ValueError, match="declared 0/1"):
        interval(graded, binary=True)


def test_graded_scores_that_all_agree_get_the_worst_case_interval_not_width_zero():
    assert interval([0.0] * 6, binary=False) == wilson(0, 6)  # F1 of 0 on six examples: not "exactly 0"
    assert interval([0.25] * 4, binary=False) == wilson(1.0, 4)  # as wide as 1 of 4 successes
    difference, lo, hi = paired_difference([0.3] * 5, [0.3] * 5, binary=False)
    low, high = wilson(2.5, 5)
    assert (difference, lo, hi) == (0.0, pytest.approx(2 * low - 1), pytest.approx(2 * high - 1))
    assert lo < 0 < hi


def test_bootstrap_is_deterministic_by_seed_and_brackets_the_mean():
    rng = random.Random(1)
    scores = [rng.random() for _ in range(30)]
    assert bootstrap_mean(scores, seed=3) == bootstrap_mean(scores, seed=3)
    assert bootstrap_mean(scores, seed=3) != bootstrap_mean(scores, seed=4)
    lo, hi = bootstrap_mean(scores)
    assert lo < sum(scores) / len(scores) < hi


def coverage(make_interval, draw, truth: float, trials: int = 300) -> float:
    rng = random.Random(12345)
    hits = 0
    for trial in range(trials):
        lo, hi = make_interval(draw(rng), trial)
        hits += lo <= truth <= hi
    return hits / trials


def test_bootstrap_covers_a_known_mean_about_95_percent_of_the_time():
    # scores uniform on [0, 1] squared: mean 1/3, skewed like F1 scores are
    rate = coverage(lambda scores, seed: bootstrap_mean(scores, seed, resamples=500),
                    lambda rng: [rng.random() ** 2 for _ in range(40)], truth=1 / 3)
    assert 0.89 <= rate <= 0.99


def test_wilson_covers_a_bernoulli_about_95_percent_of_the_time():
    rate = coverage(lambda scores, _: wilson(int(sum(scores)), len(scores)),
                    lambda rng: [float(rng.random() < 0.3) for _ in range(25)], truth=0.3, trials=1000)
    assert 0.91 <= rate <= 0.99


def correlated_pairs(rng, n, p_baseline, p_manipulated):
    """0/1 pairs sharing each example's difficulty: an example the baseline gets wrong is harder for both."""
    pairs = []
    for _ in range(n):
        easy = rng.random()
        pairs.append((float(easy < p_manipulated), float(easy < p_baseline)))
    return [m for m, _ in pairs], [b for _, b in pairs]


def test_newcombe_covers_the_paired_difference_and_pairing_narrows_it():
    # manipulated 0.5, baseline 0.7, fully nested: difference -0.2
    rate = coverage(lambda pair, _: newcombe_paired(*pair), lambda rng: correlated_pairs(rng, 30, 0.7, 0.5),
                    truth=-0.2, trials=1000)
    assert 0.92 <= rate <= 0.995
    manipulated, baseline = correlated_pairs(random.Random(0), 40, 0.7, 0.5)
    paired = newcombe_paired(manipulated, baseline)
    separate = [wilson(int(sum(manipulated)), 40), wilson(int(sum(baseline)), 40)]
    unpaired_width = math.hypot(*(hi - lo for lo, hi in separate))  # the width if the two were independent
    assert paired[1] - paired[0] < unpaired_width


def test_newcombe_is_not_certain_when_every_pair_agrees():
    lo, hi = newcombe_paired([1.0] * 8 + [0.0] * 2, [1.0] * 8 + [0.0] * 2)
    assert lo < 0 < hi  # no difference seen, but 10 examples cannot rule a small one out


def draw_graded_pairs(rng):
    """40 examples: a baseline score per example, and a manipulated score 0.1 lower on average (skewed noise)."""
    baseline = [rng.random() for _ in range(40)]
    return [b - 0.1 + 0.3 * (rng.random() ** 2 - 1 / 3) for b in baseline], baseline


def test_paired_bootstrap_covers_a_difference_of_graded_scores():
    rate = coverage(lambda pair, seed: paired_bootstrap(*pair, seed=seed, resamples=500), draw_graded_pairs,
                    truth=-0.1)
    assert 0.9 <= rate <= 0.99


def test_paired_difference_picks_its_method_and_refuses_unpaired_input():
    assert paired_difference([1.0, 0.0, 1.0], [1.0, 1.0, 1.0], binary=True) == (
        pytest.approx(-1 / 3), *newcombe_paired([1.0, 0.0, 1.0], [1.0, 1.0, 1.0]))
    graded = paired_difference([0.5, 0.2, 0.9], [0.6, 0.2, 1.0], binary=False)
    assert graded == (pytest.approx(-0.2 / 3), *paired_bootstrap([0.5, 0.2, 0.9], [0.6, 0.2, 1.0]))
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([1.0], [1.0, 0.0], binary=True)
