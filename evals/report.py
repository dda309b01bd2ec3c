"""The reproduction report: where each curve recovers, next to the paper's claims.

`write_report(run_dir)` reads a run directory (sweep results, and the swap experiment's when
present), draws the figures into `run_dir/figures/`, and writes

    report.md       a page to read: recovery per task and manipulation, the swap rates,
                    sample outputs, links to the figures
    summary.json    the same numbers for programs

Recovery, precisely: a curve is the mean score at each measured k, ending with the baseline at
k = L. It *recovers from k* when every measured k' >= k scores at least 90% of the baseline;
the recovery layer is the smallest such k. Requiring every higher point (not just one) keeps a
single lucky point low in the model from counting as recovery on a noisy curve. `k / L` is the
depth fraction; `1 - k / L` the share of top layers whose view of previous tokens can be
manipulated at little cost.

The paper's claims (Ben-Artzy & Schwartz 2024): manipulating previous tokens in the top 30-50%
of layers barely hurts, i.e. curves recover by k/L = 0.5-0.7, while manipulating low can drop a
task to chance; a swapped country is followed when swapped low and ignored in the top third.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from evals.aggregate import BASELINE, RECOVERY, Point, TaskSummary, aggregate
from evals.plots import plot_curves, plot_swap
from evals.results import load_results
from evals.swap import SWAP_FILE, SwapRates, swap_rates

PAPER_RECOVERY = (0.5, 0.7)  # k/L by which the paper's curves recover (top 30-50% of layers manipulable)
PAPER_SWAP_IGNORED = 2 / 3  # the paper: swaps in the top third of layers are ignored
MIN_MARGIN = 0.05  # a baseline closer than this to chance says nothing about what a manipulation costs
TIMING_FILE = "timing.json"


def recovery_layer(points: Sequence[Point], baseline: float, share: float = RECOVERY) -> int | None:
    """Smallest measured k such that every measured k' >= k scores >= share * baseline.

    None when not even the highest point does; a sweep's curves end with the baseline itself at k = L,
    so for them the answer is at most L.
    """
    # Means of 0/1 scores land exactly on the threshold (0.72 = 0.9 * 0.8): rounding must not decide.
    threshold = share * baseline - 1e-9
    recovered = None
    for point in sorted(points, key=lambda p: p.k, reverse=True):
        if point.score < threshold:
            break
        recovered = point.k
    return recovered


def informative(summary: TaskSummary) -> bool:
    """Whether the baseline beats chance clearly enough for a curve to show what a manipulation costs."""
    return not math.isnan(summary.chance) and summary.baseline.score >= summary.chance + MIN_MARGIN


def verdict(summary: TaskSummary, points: Sequence[Point], recovered: int) -> str:
    """The curve's behaviour in words, against the paper's 'recovers by k/L = 0.5-0.7'."""
    if not informative(summary):
        return f"baseline within {MIN_MARGIN} of chance: no evidence either way"
    L = summary.num_layers
    if recovered == points[0].k:
        return "never below 90% of baseline: the manipulation does not hurt at any measured k"
    if recovered == L:
        return "no measured k < L keeps 90% of baseline: fewer layers manipulable than in the paper"
    if recovered / L < PAPER_RECOVERY[0]:
        return "recovers earlier than the paper (more layers manipulable)"
    if recovered / L <= PAPER_RECOVERY[1]:
        return "agrees with the paper"
    return "recovers later than the paper (fewer layers manipulable)"


def crossover_layer(rates: SwapRates) -> int | None:
    """Smallest k from which the original answer is at least as frequent as the injected one at every k' >= k."""
    crossed = None
    for k, original, injected in reversed(list(zip(rates.ks, rates.original, rates.injected))):
        if original < injected:
            break
        crossed = k
    return crossed


# ----------------------------------------------------------------------------- writing

def fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def cell(text: str, width: int = 70) -> str:
    """Text fit for a markdown table cell: one line, no pipes, at most `width` characters."""
    text = " ".join(text.split()).replace("|", "/")
    if not text:
        return "(empty)"
    return text if len(text) <= width else text[:width - 1] + "…"


def recovery_rows(summaries: dict[str, TaskSummary]) -> list[dict]:
    rows = []
    for summary in summaries.values():
        for kind, points in summary.curves.items():
            recovered = recovery_layer(points, summary.baseline.score)
            rows.append({"task": summary.task, "kind": kind, "recovery_k": recovered,
                         "recovery_fraction": recovered / summary.num_layers,
                         "lowest_k": points[0].k, "score_at_lowest_k": points[0].score,
                         "at_chance_at_lowest_k": points[0].score <= summary.chance + 1e-9,
                         "verdict": verdict(summary, points, recovered)})
    return rows


def recovery_table(summaries: dict[str, TaskSummary], rows: list[dict]) -> list[str]:
    lines = ["| task | metric | baseline | chance | manipulation | recovers from k | k/L | top layers manipulable "
             "| score at lowest k | at or below chance there | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        summary = summaries[row["task"]]
        lines.append(f"| {row['task']} | {summary.metric} | {fmt(summary.baseline.score)} | {fmt(summary.chance)} "
                     f"| {row['kind']} | {row['recovery_k']} | {row['recovery_fraction']:.2f} "
                     f"| {1 - row['recovery_fraction']:.0%} | {fmt(row['score_at_lowest_k'])} (k={row['lowest_k']}) "
                     f"| {'yes' if row['at_chance_at_lowest_k'] else 'no'} | {row['verdict']} |")
    return lines


def swap_section(rates: SwapRates) -> tuple[list[str], dict]:
    if not rates.pairs:
        return ["No country pair qualified: a pair needs two countries whose names are single tokens and "
                "whose capitals the model gives unmanipulated, and this model gave none."], {"pairs": 0}
    L = rates.num_layers
    top = [i for i, k in enumerate(rates.ks) if k >= PAPER_SWAP_IGNORED * L and k < L]
    crossed = crossover_layer(rates)
    numbers = {
        "pairs": rates.pairs,
        "injected_at_lowest_k": rates.injected[0], "original_at_lowest_k": rates.original[0],
        "lowest_k": rates.ks[0],
        "original_in_top_third": sum(rates.original[i] for i in top) / len(top) if top else float("nan"),
        "injected_in_top_third": sum(rates.injected[i] for i in top) / len(top) if top else float("nan"),
        "crossover_k": crossed, "crossover_fraction": crossed / L,
    }
    followed_low = numbers["injected_at_lowest_k"] > numbers["original_at_lowest_k"]
    ignored_top = crossed <= math.ceil(PAPER_SWAP_IGNORED * L)
    lines = [
        f"{rates.pairs} country pairs that the model answers correctly at baseline (single-token names).",
        "",
        f"- Swapped at k = {rates.ks[0]}: injected answer {fmt(numbers['injected_at_lowest_k'])}, original "
        f"{fmt(numbers['original_at_lowest_k'])}: the swapped token is "
        f"{'followed' if followed_low else 'not followed'} (paper: followed).",
        f"- Swapped in the top third (k >= {math.ceil(PAPER_SWAP_IGNORED * L)}): original answer "
        f"{fmt(numbers['original_in_top_third'])}, injected {fmt(numbers['injected_in_top_third'])}.",
        f"- The original answer wins at every k from k = {crossed} (k/L = {crossed / L:.2f}) up: the swap is "
        f"ignored in the top {1 - crossed / L:.0%} of layers (paper: in the top third; "
        f"{'agrees' if ignored_top else 'a smaller top part here'}).",
        "",
        "| k | " + " | ".join(str(k) for k in rates.ks) + " |",
        "|---|" + "---|" * len(rates.ks),
        "| original | " + " | ".join(f"{r:.2f}" for r in rates.original) + " |",
        "| injected | " + " | ".join(f"{r:.2f}" for r in rates.injected) + " |",
    ]
    return lines, numbers


def sample_outputs(records: dict[tuple, dict], summary: TaskSummary) -> list[str]:
    """Predictions for one example at a few k per manipulation: the example with the best baseline score."""
    L = summary.num_layers
    baselines = [r for r in records.values() if r["task"] == summary.task and r["kind"] == BASELINE]
    best = min(baselines, key=lambda r: (-r["scores"][r["metric"]], r["example"]))
    lines = [f"Example `{best['example']}`, gold: {cell(best['golds'][0])}", "",
             "| manipulation | k | prediction |", "|---|---|---|",
             f"| none (baseline) | {L} | {cell(best['prediction'])} |"]
    for kind, points in summary.curves.items():
        measured = [p.k for p in points if p.k < L]
        shown = sorted({measured[round(i * (len(measured) - 1) / 3)] for i in range(4)}) if measured else []
        for k in shown:
            for record in records.values():  # every seed's answer for random
                if (record["task"], record["example"], record["kind"], record["k"]) == (
                        summary.task, best["example"], kind, k):
                    seed = "" if record["seed"] is None else f" (seed {record['seed']})"
                    lines.append(f"| {kind}{seed} | {k} | {cell(record['prediction'])} |")
    return lines


def write_report(run_dir: str | os.PathLike) -> Path:
    """Figures, report.md and summary.json for a run directory; returns the report's path."""
    run_dir = Path(run_dir)
    records = load_results(run_dir)
    summaries = aggregate(records.values())
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    plot_curves(summaries, figures / "curves.png")
    first = next(iter(records.values()))
    L = first["num_layers"]
    rows = recovery_rows(summaries)

    lines = [
        f"# Attend First, Consolidate Later: reproduction with {first['model']}",
        "",
        f"Model `{first['model']}` ({L} layers, {first['dtype']}), greedy decoding. k is the first layer whose "
        "view of previous tokens is altered; k = L is the unmanipulated baseline.",
    ]
    timing_path = run_dir / TIMING_FILE
    if timing_path.exists():
        timing = json.loads(timing_path.read_text())
        settings = timing["settings"]
        lines.append(f"Run time: {timing['total_s'] / 60:.1f} min (sweep {timing['sweep_s'] / 60:.1f}, swap "
                     f"{timing['swap_s'] / 60:.1f}; CPU time {timing['cpu_s'] / 60:.1f}) on {settings['device']}, "
                     f"threads {settings['threads'] or 'default'}, batch size {settings['batch_size']}, "
                     f"layers {settings['layers']}.")
    lines += [
        "",
        "## The paper's claims",
        "",
        "- Manipulating previous tokens' hidden states in the top 30-50% of layers barely hurts: curves recover "
        f"to {RECOVERY:.0%} of baseline by k/L = {PAPER_RECOVERY[0]}-{PAPER_RECOVERY[1]}.",
        "- The same manipulation in low layers can drop a task to chance.",
        "- A swapped token ('Italy' for 'France') is followed when swapped low and ignored in the top third.",
        "",
        "## Recovery per task and manipulation",
        "",
        f"A curve *recovers from k* when every measured k' >= k scores at least {RECOVERY:.0%} of the baseline "
        "(the smallest such k is shown). Examples per task: "
        + ", ".join(f"{s.task} {s.baseline.count}" for s in summaries.values()) + ".",
        "",
        *recovery_table(summaries, rows),
        "",
        "![score vs k](figures/curves.png)",
        "",
        "Numbers: [figures/curves.csv](figures/curves.csv).",
        "",
    ]
    summary_json = {"model": first["model"], "dtype": first["dtype"], "num_layers": L,
                    "tasks": {task: summary.to_dict() for task, summary in summaries.items()}, "recovery": rows}
    if (run_dir / SWAP_FILE).exists():
        rates = swap_rates(run_dir)
        swap_lines, swap_numbers = swap_section(rates)
        lines += ["## Swap", "", *swap_lines, ""]
        if rates.pairs:
            plot_swap(rates, figures / "swap.png")
            lines += ["![swap heat-map](figures/swap.png)", "", "Numbers: [figures/swap.csv](figures/swap.csv).", ""]
        summary_json["swap"] = rates.to_dict() | swap_numbers
    lines += ["## Sample outputs", ""]
    for summary in summaries.values():
        lines += [f"### {summary.task}", "", *sample_outputs(records, summary), ""]

    (run_dir / "summary.json").write_text(json.dumps(summary_json, indent=1) + "\n", encoding="utf-8")
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
