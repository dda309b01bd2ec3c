"""95% intervals for the scores a sweep shows, and for a manipulated score against the baseline.

- `wilson`: the Wilson score interval for a proportion (exact match, accuracy: 0/1 scores). Unlike
  the normal approximation it stays inside [0, 1] and is not of width zero at 0 or n successes.
- `bootstrap_mean`: a seeded percentile bootstrap over examples, for scores in [0, 1] that are not
  0/1 (token F1, ROUGE, or 0/1 scores averaged over several seeds).
- `paired_difference`: an interval for mean(manipulated) - mean(baseline) over the *same* examples.
  Pairing removes the examples' own difficulty from the comparison, so it decides far more often
  than two separate intervals would. For 0/1 scores it is Newcombe's hybrid score interval for
  paired proportions (built from the two Wilson intervals and the correlation of the pairs); for
  other scores, a seeded paired bootstrap of the per-example differences.
- `interval`: the right one of the first two for a list of scores.

Which one is right depends on what the scores are, not on the values that happened to come out:
`binary` says the scores are 0/1 outcomes (exact match, accuracy, one seed). A ROUGE score that is
0 on every example is still a graded score, and gets the bootstrap.

When every graded score (or every paired difference) is the same, resampling shows no spread at
all and the bootstrap interval has width zero, which no sample of a few examples justifies. Then
the interval is Wilson's for the mean: scores in [0, 1] with mean m have a variance of at most
m(1 - m), the variance of 0/1 scores, so this is the interval of the worst case (differences in
[-1, 1] are mapped to [0, 1] and back).

Everything is deterministic: the bootstraps draw from numpy's `default_rng(seed)`, so the same scores
give the same interval bytes on every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 2000
SEED = 0


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: successes out of n trials (a fraction: see the module doc)."""
    if n < 1:
        raise ValueError("a proportion needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n = {n}, got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


BINARY_METRICS = ("exact_match", "accuracy")  # scores that are 0/1 outcomes per example


def check_binary(scores: Sequence[float]) -> None:
    if not all(score in (0.0, 1.0) for score in scores):
        raise ValueError("scores declared 0/1 (exact match, accuracy) hold other values")


def bootstrap_mean(scores: Sequence[float], seed: int = SEED, resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the examples with replacement."""
    if len(scores) == 0:
        raise ValueError("a mean needs at least one score")
    values = np.asarray(scores, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    lo, hi = np.percentile(values[picks].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def interval(scores: Sequence[float], binary: bool, seed: int = SEED) -> tuple[float, float]:
    """95% interval of the mean score: Wilson for 0/1 scores, the bootstrap otherwise."""
    if binary:
        check_binary(scores)
        return wilson(int(sum(scores)), len(scores))
    if min(scores) == max(scores):  # nothing to resample: the worst case for scores in [0, 1]
        return wilson(sum(scores), len(scores))
    return bootstrap_mean(scores, seed)


def newcombe_paired(first: Sequence[float], second: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval (his method 10) for p(first) - p(second), 0/1 scores paired by example."""
    n = len(first)
    both = sum(1 for a, b in zip(first, second) if a and b)
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson(both + only_first, n, z)
    l2, u2 = wilson(both + only_second, n, z)
    # phi: the correlation of the two 0/1 columns (0 when a margin is empty: then it does not matter)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2 - below, p1 - p2 + above


def paired_bootstrap(first: Sequence[float], second: Sequence[float], seed: int = SEED,
                     resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap of mean(first - second): resample examples, keeping each example's pair together."""
    return bootstrap_mean([a - b for a, b in zip(first, second)], seed, resamples)


def paired_difference(manipulated: Sequence[float], baseline: Sequence[float], binary: bool,
                      seed: int = SEED) -> tuple[float, float, float]:
    """mean(manipulated) - mean(baseline) over the same examples, with its 95% interval: (difference, lo, hi)."""
    if len(manipulated) != len(baseline) or not manipulated:
        raise ValueError(f"a paired comparison needs the same examples on both sides, got {len(manipulated)} "
                         f"and {len(baseline)} scores")
    difference = (sum(manipulated) - sum(baseline)) / len(manipulated)
    if binary:
        check_binary([*manipulated, *baseline])
        lo, hi = newcombe_paired(manipulated, baseline)
    elif len({a - b for a, b in zip(manipulated, baseline)}) == 1:  # the same difference everywhere: worst case
        lo, hi = wilson((difference + 1) / 2 * len(manipulated), len(manipulated))
        lo, hi = 2 * lo - 1, 2 * hi - 1
    else:
        lo, hi = paired_bootstrap(manipulated, baseline, seed)
    return difference, lo, hi
