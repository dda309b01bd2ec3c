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

With uncertainty: each point carries a paired 95% interval for (its score - the baseline's) over
the same examples (`evals.stats.paired_difference`). A point is *clearly below* when that interval
lies entirely under -10% of the baseline score, and *clearly holds* when it lies entirely at or
above it. The recovery layer then lies between the smallest k above every clearly-below point
(the earliest the data allow) and the smallest k from which every point clearly holds (the
latest); the verdict compares that whole range with the paper's, and says "too few examples to
tell" when the range straddles the paper's bounds.

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
from evals.results import MANIFEST_FILE, RESULTS_GLOB, SweepError, load_results
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
    if math.isnan(summary.chance):
        return "chance level unknown (it needs at least two examples): no evidence either way"
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


def recovery_range(points: Sequence[Point], baseline: float, share: float = RECOVERY) -> tuple[int, int]:
    """(earliest, latest) k at which the curve may recover, given each point's paired interval against the baseline.

    earliest: the smallest measured k such that no k' >= k is clearly below share * baseline;
    latest: the smallest measured k such that every k' >= k clearly holds. A point without an
    interval is neither. The baseline itself (k = L) always holds, so both are at most L.
    """
    margin = -(1 - share) * baseline - 1e-9  # the lowest score - baseline that still counts as recovered
    ordered = sorted(points, key=lambda p: p.k, reverse=True)
    earliest = latest = ordered[0].k
    for point in ordered:
        if point.difference_hi is not None and point.difference_hi < margin:
            break
        earliest = point.k
    for point in ordered:
        if point.difference_lo is None or point.difference_lo < margin:
            break
        latest = point.k
    return earliest, latest


def decide(summary: TaskSummary, points: Sequence[Point]) -> str:
    """The verdict that the intervals support: `verdict` when they pin the recovery layer down, else its range."""
    if informative(summary) and summary.baseline.lo is not None and summary.baseline.lo <= summary.chance:
        return "baseline not clearly above chance (its 95% interval reaches chance): no evidence either way"
    earliest, latest = recovery_range(points, summary.baseline.score)
    if not informative(summary) or earliest == latest:
        return verdict(summary, points, earliest)
    L = summary.num_layers
    low, high = earliest / L, latest / L
    where = f"recovery somewhere in k = {earliest}..{latest} (k/L {low:.2f}-{high:.2f})"
    if latest < L and high < PAPER_RECOVERY[0]:
        return f"recovers earlier than the paper (more layers manipulable): {where}"
    if latest < L and PAPER_RECOVERY[0] <= low and high <= PAPER_RECOVERY[1]:
        return f"agrees with the paper: {where}"
    if low > PAPER_RECOVERY[1]:
        return f"recovers later than the paper (fewer layers manipulable): {where}"
    return f"too few examples to tell: {where}, against the paper's {PAPER_RECOVERY[0]}-{PAPER_RECOVERY[1]}"


def crossover_layer(rates: SwapRates) -> int | None:
    """Smallest k from which the original answer is at least as frequent as the injected one at every k' >= k."""
    crossed = None
    for k, original, injected in reversed(list(zip(rates.ks, rates.original, rates.injected))):
        if original < injected:
            break
        crossed = k
    return crossed


def crossover_range(rates: SwapRates) -> tuple[int, int]:
    """(earliest, latest) k from which the original answer wins, as far as the rates' 95% intervals can tell.

    earliest: the smallest k with no k' >= k where the injected answer clearly wins (its interval
    entirely above the original's); latest: the smallest k from which the original clearly wins at
    every k'. With no swap at k = L the original always wins there, so both are at most L.
    """
    rows = list(zip(rates.ks, rates.original_interval, rates.injected_interval))[::-1]
    earliest = latest = rows[0][0]
    for k, original, injected in rows:
        if injected[0] > original[1]:
            break
        earliest = k
    for k, original, injected in rows:
        if original[0] <= injected[1]:
            break
        latest = k
    return earliest, latest


def swap_verdict(rates: SwapRates) -> str:
    """Whether the swap is ignored in the top third, as the paper says, in the words the intervals allow."""
    top_third = math.ceil(PAPER_SWAP_IGNORED * rates.num_layers)
    earliest, latest = crossover_range(rates)
    if latest <= top_third:
        return "agrees"
    if earliest > top_third:
        return "a smaller top part here"
    return f"too few pairs to tell: the original answer takes over somewhere in k = {earliest}..{latest}"


# ----------------------------------------------------------------------------- writing

def fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def span(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f"[{lo:.2f}, {hi:.2f}]"


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
            earliest, latest = recovery_range(points, summary.baseline.score)
            rows.append({"task": summary.task, "kind": kind, "recovery_k": recovered,
                         "recovery_fraction": recovered / summary.num_layers, "recovery_k_range": [earliest, latest],
                         "lowest_k": points[0].k, "score_at_lowest_k": points[0].score,
                         "interval_at_lowest_k": [points[0].lo, points[0].hi],
                         "at_chance_at_lowest_k": points[0].score <= summary.chance + 1e-9,
                         "verdict": decide(summary, points)})
    return rows


def recovery_table(summaries: dict[str, TaskSummary], rows: list[dict]) -> list[str]:
    lines = ["| task | metric | baseline [95% CI] (n) | chance | manipulation | recovers from k | k range the intervals "
             "allow | k/L | top layers manipulable | score at lowest k [95% CI] | at or below chance there | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        summary = summaries[row["task"]]
        baseline = summary.baseline
        earliest, latest = row["recovery_k_range"]
        lines.append(f"| {row['task']} | {summary.metric} | {fmt(baseline.score)} {span(baseline.lo, baseline.hi)} "
                     f"({baseline.n}) | {fmt(summary.chance)} | {row['kind']} | {row['recovery_k']} "
                     f"| {earliest}-{latest} | {row['recovery_fraction']:.2f} | {1 - row['recovery_fraction']:.0%} "
                     f"| {fmt(row['score_at_lowest_k'])} {span(*row['interval_at_lowest_k'])} (k={row['lowest_k']}) "
                     f"| {'yes' if row['at_chance_at_lowest_k'] else 'no'} | {row['verdict']} |")
    return lines


def headline_intervals(summaries: dict[str, TaskSummary]) -> list[str]:
    """Per task: the baseline's 95% half-width, and the widest and median half-width of its curves' points."""
    lines = []
    for summary in summaries.values():
        widths = sorted(p.half_width for points in summary.curves.values() for p in points[:-1]
                        if p.half_width is not None)
        curve = (f"; curve points: median +-{widths[len(widths) // 2]:.3f}, widest +-{widths[-1]:.3f}"
                 if widths else "")
        spreads = sorted(p.seed_spread for points in summary.curves.values() for p in points
                         if p.seed_spread is not None)
        seeds = (f"; spread between seeds (sd of the per-seed means): median {spreads[len(spreads) // 2]:.3f}, "
                 f"largest {spreads[-1]:.3f}" if spreads else "")
        lines.append(f"- {summary.task} ({summary.metric}, n = {summary.baseline.n}): baseline "
                     f"{fmt(summary.baseline.score)} +-{summary.baseline.half_width:.3f}{curve}{seeds}")
    return lines


def results_table(summaries: dict[str, TaskSummary]) -> str:
    """Every point as a plain-text table (task, kind, k, n, score, 95% interval), as a sweep ends with."""
    header = ("task", "kind", "k", "n", "score", "95% interval", "vs baseline [95% CI]")
    rows = []
    for summary in summaries.values():
        for kind, points in [(BASELINE, [summary.baseline])] + list(summary.curves.items()):
            for p in points if kind == BASELINE else points[:-1]:
                versus = ("" if kind == BASELINE or p.difference is None  # no shared examples: another shard's
                          else f"{p.difference:+.3f} [{p.difference_lo:+.3f}, {p.difference_hi:+.3f}]")
                spread = "" if p.seed_spread is None else f" (seed sd {p.seed_spread:.3f})"
                rows.append((summary.task, kind, str(p.k), str(p.n), f"{p.score:.3f}{spread}",
                             f"[{p.lo:.3f}, {p.hi:.3f}]", versus))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * width for width in widths)), *map(line, rows)])


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
        "crossover_k": crossed, "crossover_fraction": crossed / L, "crossover_k_range": list(crossover_range(rates)),
    }
    # followed: the injected answer's interval lies above the original's, not just its rate
    followed_low = rates.injected_interval[0][0] > rates.original_interval[0][1]
    lines = [
        f"{rates.pairs} country pairs that the model answers correctly at baseline (single-token names); "
        "rates with their 95% Wilson interval over the pairs.",
        "",
        f"- Swapped at k = {rates.ks[0]}: injected answer {fmt(numbers['injected_at_lowest_k'])} "
        f"{span(*rates.injected_interval[0])}, original {fmt(numbers['original_at_lowest_k'])} "
        f"{span(*rates.original_interval[0])}: the swapped token is "
        f"{'followed' if followed_low else 'not clearly followed'} (paper: followed).",
        f"- Swapped in the top third (k >= {math.ceil(PAPER_SWAP_IGNORED * L)}): original answer "
        f"{fmt(numbers['original_in_top_third'])}, injected {fmt(numbers['injected_in_top_third'])}.",
        f"- The original answer wins at every k from k = {crossed} (k/L = {crossed / L:.2f}) up: the swap is "
        f"ignored in the top {1 - crossed / L:.0%} of layers (paper: in the top third; "
        f"{swap_verdict(rates)}).",
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


def run_facts(run_dir: Path, records: list[dict]) -> dict:
    """Model, dtype and depth of a run: from its manifest, else from its first record."""
    manifest_path = run_dir / MANIFEST_FILE
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        return {key: manifest[key] for key in ("model", "dtype", "num_layers")}
    return {key: records[0][key] for key in ("model", "dtype", "num_layers")}


def write_report(run_dir: str | os.PathLike) -> Path:
    """Figures, report.md and summary.json for a run folder (sweep, swap or both; shards merged)."""
    run_dir = Path(run_dir)
    has_sweep, has_swap = any(run_dir.glob(RESULTS_GLOB)), (run_dir / SWAP_FILE).exists()
    if not has_sweep and not has_swap:
        raise SweepError(f"{run_dir}: no sweep results ({RESULTS_GLOB}) and no swap results ({SWAP_FILE})")
    records = load_results(run_dir) if has_sweep else {}
    rates = swap_rates(run_dir) if has_swap else None
    summaries = aggregate(records.values())
    facts = run_facts(run_dir, list(records.values()) or [{"model": "?", "dtype": "?", "num_layers": rates.num_layers}])
    L = facts["num_layers"]
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)

    lines = [
        f"# Attend First, Consolidate Later: reproduction with {facts['model']}",
        "",
        f"Model `{facts['model']}` ({L} layers, {facts['dtype']}), greedy decoding. k is the first layer whose "
        "view of previous tokens is altered; k = L is the unmanipulated baseline. Every score comes with its "
        "number of examples n and a 95% interval.",
    ]
    timing_path = run_dir / TIMING_FILE
    if timing_path.exists():
        timing = json.loads(timing_path.read_text())
        settings = timing["settings"]
        if settings.get("quick"):
            lines += ["", "**Smoke run (`--quick`)**: a handful of examples per task, to check that the whole "
                      "pipeline works. Its numbers support no conclusion about the paper's claims."]
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
    ]
    summary_json = {**facts, "tasks": {task: summary.to_dict() for task, summary in summaries.items()}}
    if summaries:
        plot_curves(summaries, figures / "curves.png")
        rows = recovery_rows(summaries)
        summary_json["recovery"] = rows
        lines += [
            "## Recovery per task and manipulation",
            "",
            f"A curve *recovers from k* when every measured k' >= k scores at least {RECOVERY:.0%} of the baseline "
            "(the smallest such k is shown). The paired 95% interval of each point against the baseline, over the "
            "same examples, bounds where recovery can be: the *k range* column; the verdict uses that range, and "
            "says so when it is too wide to place against the paper's.",
            "",
            *recovery_table(summaries, rows),
            "",
            "Half-widths of the 95% intervals:",
            "",
            *headline_intervals(summaries),
            "",
            "![score vs k](figures/curves.png)",
            "",
            "Numbers, with intervals: [figures/curves.csv](figures/curves.csv).",
            "",
        ]
    if rates is not None:
        swap_lines, swap_numbers = swap_section(rates)
        lines += ["## Swap", "", *swap_lines, ""]
        if rates.pairs:
            plot_swap(rates, figures / "swap.png")
            lines += ["![swap heat-map](figures/swap.png)", "", "Numbers: [figures/swap.csv](figures/swap.csv).", ""]
        summary_json["swap"] = rates.to_dict() | swap_numbers
    if summaries:
        lines += ["## Sample outputs", ""]
        for summary in summaries.values():
            lines += [f"### {summary.task}", "", *sample_outputs(records, summary), ""]

    (run_dir / "summary.json").write_text(json.dumps(summary_json, indent=1) + "\n", encoding="utf-8")
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
