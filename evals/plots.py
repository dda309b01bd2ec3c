"""The paper's figures: score vs k for each manipulation, and the swap heat-map.

Every figure is written as a PNG with its numbers next to it in a CSV of the same name, so a
figure can be checked, or redrawn with another tool, without rerunning anything.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402

from evals.aggregate import RECOVERY, Point, TaskSummary  # noqa: E402
from evals.swap import SwapRates  # noqa: E402

KIND_STYLE = {  # one colour and marker per manipulation, the same in every panel
    "random": dict(color="tab:red", marker="o"),
    "freeze": dict(color="tab:blue", marker="s"),
    "skip_attention": dict(color="tab:green", marker="^"),
}


def plot_curves(summaries, path: str | os.PathLike) -> list[Path]:
    """One panel per task: mean score vs k/L for each manipulation with its 95% band, baseline and chance lines.

    `summaries`: a sweep's result (`evals.sweep.SweepResult`) or its task summaries (`evals.aggregate`).
    Writes `path` (PNG) and the same name with .csv: task, kind, k, k/L, score, count (records), n
    (examples), the score's 95% interval, the spread between seeds, and the paired difference from
    the baseline with its 95% interval.
    """
    summaries: dict[str, TaskSummary] = getattr(summaries, "summaries", summaries)
    path = Path(path)
    if not summaries:
        raise ValueError("nothing to plot: no task has a baseline")
    columns = min(len(summaries), 2)
    rows = math.ceil(len(summaries) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for axis, summary in zip(axes.flat, summaries.values()):
        L = summary.num_layers
        for kind, points in summary.curves.items():
            style = KIND_STYLE.get(kind, {})
            x = [p.k / L for p in points]
            axis.plot(x, [p.score for p in points], label=kind, markersize=4, **style)
            if all(p.lo is not None for p in points):
                axis.fill_between(x, [p.lo for p in points], [p.hi for p in points], alpha=0.15, linewidth=0,
                                  color=style.get("color"))
        axis.axhline(summary.baseline.score, color="black", linestyle="--", linewidth=1, label="baseline")
        axis.axhline(RECOVERY * summary.baseline.score, color="grey", linestyle=":", linewidth=1,
                     label=f"{RECOVERY:.0%} of baseline")
        axis.axhline(summary.chance, color="tab:purple", linestyle="-.", linewidth=1, label="chance")
        axis.set_title(f"{summary.task} (n = {summary.baseline.n}; bands: 95% intervals)")
        axis.set_xlabel(f"k / L  (bottom),  k  (top): manipulated from layer k up; L = {L}")
        axis.set_ylabel(summary.metric)
        axis.set_xlim(0, 1)
        axis.set_ylim(bottom=0)
        axis.secondary_xaxis("top", functions=(lambda x, L=L: x * L, lambda k, L=L: k / L))
    for axis in list(axes.flat)[len(summaries):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))  # leave the bottom strip to the shared legend
    figure.savefig(path, dpi=90)
    plt.close(figure)

    table = path.with_suffix(".csv")
    with open(table, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "kind", "k", "k_over_L", "score", "count", "n", "lo", "hi", "seed_spread",
                         "difference", "difference_lo", "difference_hi"])
        for summary in summaries.values():
            writer.writerow(csv_row(summary, "baseline", summary.baseline))
            writer.writerow([summary.task, "chance", "", "", summary.chance] + [""] * 8)
            for kind, points in summary.curves.items():
                writer.writerows(csv_row(summary, kind, p) for p in points)
    return [path, table]


def csv_row(summary: TaskSummary, kind: str, p: Point) -> list:
    return [summary.task, kind, p.k, p.k / summary.num_layers, p.score, p.count, p.n, p.lo, p.hi, p.seed_spread,
            p.difference, p.difference_lo, p.difference_hi]


def plot_swap(rates: SwapRates, path: str | os.PathLike) -> list[Path]:
    """The swap heat-map in the paper's style: rows original / injected answer, columns k, colour = rate.

    Writes `path` (PNG) and the same name with .csv: k, k/L, original and injected rate with their
    95% Wilson intervals, pairs.
    """
    path = Path(path)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.32 * len(rates.ks) + 2), 2.4))
    image = axis.imshow([rates.original, rates.injected], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axis.set_yticks([0, 1], ["original\nanswer", "injected\nanswer"])
    axis.set_xticks(range(len(rates.ks)), [str(k) for k in rates.ks], fontsize=7)
    axis.set_xlabel(f"k: the swap happens at the input of layer k (k = {rates.num_layers}: no swap)")
    axis.set_title(f"Swap: country token replaced by another country's state ({rates.pairs} pairs)")
    figure.colorbar(image, ax=axis, label="rate")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)

    table = path.with_suffix(".csv")
    with open(table, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["k", "k_over_L", "original", "original_lo", "original_hi", "injected", "injected_lo",
                         "injected_hi", "pairs"])
        for k, original, (original_lo, original_hi), injected, (injected_lo, injected_hi) in zip(
                rates.ks, rates.original, rates.original_interval, rates.injected, rates.injected_interval):
            writer.writerow([k, k / rates.num_layers, original, original_lo, original_hi, injected, injected_lo,
                             injected_hi, rates.pairs])
    return [path, table]


def plot_window_heatmap(cells: dict[tuple[int, int], dict], baseline: float, num_layers: int, path: Path,
                        title: str = "") -> list[Path]:
    """Task score over (k, w) for a manipulation acting on layers k .. k+w-1 only: one row per window size w,
    one column per k, each cell annotated with its score; cells not measured stay blank.

    cells: (k, w) -> {"score", "low95", "high95", "n"}. Writes `path` (PNG) and the same name with .csv:
    k, w, score, low95, high95, n, and the score over the baseline.
    """
    ks = sorted({k for k, _ in cells})
    windows = sorted({w for _, w in cells})
    grid = [[cells[(k, w)]["score"] if (k, w) in cells else math.nan for k in ks] for w in windows]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(ks) + 2), 0.7 * len(windows) + 1.8))
    image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=max(baseline, 1e-9), aspect="auto")
    for row, w in enumerate(windows):
        for column, k in enumerate(ks):
            if (k, w) in cells:
                score = cells[(k, w)]["score"]
                axis.text(column, row, f"{score:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if score < 0.6 * baseline else "black")
    axis.set_xticks(range(len(ks)), [str(k) for k in ks])
    axis.set_yticks(range(len(windows)), [str(w) for w in windows])
    axis.set_xlabel(f"k, the window's first layer (of L = {num_layers})")
    axis.set_ylabel("w, layers in the window")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis, label=f"score (baseline {baseline:.2f} = top of the scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    table = path.with_suffix(".csv")
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["k", "w", "score", "low95", "high95", "n", "score_over_baseline"])
        for (k, w), cell in sorted(cells.items()):
            ratio = cell["score"] / baseline if baseline else math.nan
            writer.writerow([k, w, cell["score"], cell["low95"], cell["high95"], cell["n"], ratio])
    return [path, table]
