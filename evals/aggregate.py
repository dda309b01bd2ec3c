"""Aggregation: records in, one curve per task and manipulation out, every point with its 95% interval.

A point is one (task, kind, k). Its examples are the unit of sampling: with several seeds (random),
an example's score is first averaged over its seeds, then the point's mean, interval and paired
comparison are taken over examples (seeds of one example are not independent evidence about the
task). See `evals.stats` for the intervals.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from evals.stats import BINARY_METRICS, interval, paired_difference

BASELINE = "baseline"  # the kind of the unmanipulated records, at k = L
RECOVERY = 0.9  # a curve has recovered when it is at or above this share of the baseline (see evals.report)


@dataclass(frozen=True)
class Point:
    k: int
    score: float  # mean primary score over examples (each example's score averaged over its seeds)
    count: int  # records averaged (examples x seeds)
    n: int = 0  # examples
    lo: float | None = None  # 95% interval of the score
    hi: float | None = None
    seed_spread: float | None = None  # standard deviation of the per-seed means (None for one seed)
    difference: float | None = None  # score - baseline over the examples both have, with its paired 95% interval
    difference_lo: float | None = None
    difference_hi: float | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2


@dataclass(frozen=True)
class TaskSummary:
    """One task's curves: mean primary score per kind and k, with the baseline and the chance level."""

    task: str
    metric: str
    chance: float
    num_layers: int
    baseline: Point
    curves: dict[str, list[Point]]  # kind -> points by k, ending with the baseline at k = L

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "chance": self.chance, "num_layers": self.num_layers,
                "baseline": asdict(self.baseline),
                "curves": {kind: [asdict(point) for point in points] for kind, points in self.curves.items()}}


def per_example(records: list[dict]) -> tuple[dict[str, float], dict[object, float]]:
    """Each example's primary score averaged over its seeds, and each seed's mean over examples."""
    by_example, by_seed = defaultdict(list), defaultdict(list)
    for record in records:
        score = record["scores"][record["metric"]]
        by_example[record["example"]].append(score)
        by_seed[record["seed"]].append(score)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return ({example: mean(scores) for example, scores in by_example.items()},
            {seed: mean(scores) for seed, scores in by_seed.items()})


def make_point(k: int, records: list[dict], baseline: dict[str, float] | None) -> Point:
    """The point of these records (one task, kind and k), compared with the baseline's per-example scores."""
    scores, seed_means = per_example(records)
    examples = sorted(scores)
    values = [scores[example] for example in examples]
    # 0/1 outcomes stay 0/1 only with one seed: averaged over seeds they are graded
    binary = records[0]["metric"] in BINARY_METRICS and len(seed_means) == 1
    lo, hi = interval(values, binary)
    spread = statistics.stdev(seed_means.values()) if len(seed_means) > 1 else None
    difference = lo_difference = hi_difference = None
    shared = [example for example in examples if baseline and example in baseline]
    if shared:
        difference, lo_difference, hi_difference = paired_difference([scores[e] for e in shared],
                                                                      [baseline[e] for e in shared], binary)
    return Point(k, sum(values) / len(values), len(records), len(values), lo, hi, spread, difference,
                 lo_difference, hi_difference)


def aggregate(records: Iterable[dict]) -> dict[str, TaskSummary]:
    """Per task, a point for each (kind, k) (see `make_point`); tasks without a baseline are left out."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    about: dict[str, dict] = {}
    for record in records:
        groups[record["task"], record["kind"], record["k"]].append(record)
        about.setdefault(record["task"], record)

    summaries = {}
    for task, record in about.items():
        L = record["num_layers"]
        if (task, BASELINE, L) not in groups:
            continue
        baseline_scores = per_example(groups[task, BASELINE, L])[0]
        # the baseline against itself: no difference, and no uncertainty about that
        baseline = replace(make_point(L, groups[task, BASELINE, L], None), difference=0.0, difference_lo=0.0,
                           difference_hi=0.0)
        curves = defaultdict(list)
        for (curve_task, kind, k), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][2])):
            if curve_task == task and kind != BASELINE:
                curves[kind].append(make_point(k, group, baseline_scores))
        summaries[task] = TaskSummary(task, record["metric"], record["chance"], L, baseline,
                                      {kind: points + [baseline] for kind, points in curves.items()})
    return summaries
