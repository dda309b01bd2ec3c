"""Aggregation: records in, one curve per task and manipulation out (mean primary score per k)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

BASELINE = "baseline"  # the kind of the unmanipulated records, at k = L
RECOVERY = 0.9  # a curve has recovered when it is at or above this share of the baseline (see evals.report)


@dataclass(frozen=True)
class Point:
    k: int
    score: float  # mean primary score over examples (and seeds)
    count: int  # records averaged


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
        as_dict = lambda point: {"k": point.k, "score": point.score, "count": point.count}  # noqa: E731
        return {"task": self.task, "metric": self.metric, "chance": self.chance, "num_layers": self.num_layers,
                "baseline": as_dict(self.baseline),
                "curves": {kind: [as_dict(point) for point in points] for kind, points in self.curves.items()}}


def aggregate(records: Iterable[dict]) -> dict[str, TaskSummary]:
    """Per task, the mean primary score for each (kind, k); tasks without a baseline are left out."""
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    about: dict[str, dict] = {}
    for record in records:
        scores[record["task"], record["kind"], record["k"]].append(record["scores"][record["metric"]])
        about.setdefault(record["task"], record)
    means = {key: Point(key[2], sum(values) / len(values), len(values)) for key, values in scores.items()}

    summaries = {}
    for task, record in about.items():
        L = record["num_layers"]
        baseline = means.get((task, BASELINE, L))
        if baseline is None:
            continue
        curves = defaultdict(list)
        for (curve_task, kind, _), point in sorted(means.items(), key=lambda item: (item[0][1], item[0][2])):
            if curve_task == task and kind != BASELINE:
                curves[kind].append(point)
        summaries[task] = TaskSummary(task, record["metric"], record["chance"], L, baseline,
                                      {kind: points + [baseline] for kind, points in curves.items()})
    return summaries
