"""Beyond the paper: the attention-sink question, layer windows, and the paper's own random, on SmolLM2-135M.

    .venv/bin/python scripts/beyond_paper.py                      # both tasks, then the summary
    .venv/bin/python scripts/beyond_paper.py --task capitals      # one task (run the two side by side)
    .venv/bin/python scripts/beyond_paper.py --task capitals --part paper    # one part of one task
    .venv/bin/python scripts/beyond_paper.py --summarize          # only the summary, from the records

Three experiments (docs/REPRODUCTION.md, "Beyond the paper"), each beside the paper's manipulation:

- sink:    random (seeds 0-2), freeze and skip_attention with spare_first = 0 (the paper's) and 1 (position 0,
           the attention sink of SmolLM2, which has no BOS, left alone) at the layers in SINK_LAYERS;
- windows: skip_attention on layers k .. k+w-1 only, w = 1, 2, 3, every 3rd k (capitals only);
- paper:   the paper's random (fresh noise at every generation step, faithful mode), seeds 0-2, beside
           ours (the same seeds, fixed noise) at PAPER_LAYERS (capitals only).

Greedy decoding, fp32, the embedded SmolLM2-135M; capitals three-shot (64 examples), context-qa (24), each
spread evenly over its task. Records go to OUT/records-TASK-PART.jsonl (one line per answer; a rerun skips
what is there), then OUT/summary.json, OUT/summary.csv, OUT/windows.png (+ .csv) and OUT/sink.png.

Intervals (95%, `evals.stats`): exact match of a deterministic condition, Wilson over the n examples;
random, a seeded percentile bootstrap over examples of each example's mean over the seeds. Differences
between two conditions on the same examples (spared vs not, the paper's random vs ours): Newcombe's paired
interval for two deterministic conditions, a paired bootstrap when seeds are averaged.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import minillm
from evals import stats
from evals.aggregate import RECOVERY
from evals.plots import plot_window_heatmap
from evals.tasks import get_task
from minillm.generate import PromptStates, generate_tokens
from minillm.manipulation import Manipulation

OUT = Path("docs/reproduction/beyond")
LIMITS = {"capitals": 64, "context-qa": 24}
BATCH = {"capitals": 64, "context-qa": 24}  # one batch: the decode steps are shared, prompts differ little
SEEDS = (0, 1, 2)
# Sized for about 20 CPU-minutes on a shared 2-core machine. Every 2nd k in the top half, where the curves
# recover (the reproduction has every curve at chance below it); a run costs the depth above its k, and
# context-qa's prompts are 8 times longer than capitals'.
# In the order they run (the most telling first), so that a run cut short still has whole pairs.
SINK_LAYERS = {"capitals": (24, 26, 22, 20, 28, 18, 16), "context-qa": (22, 26, 24, 28, 18)}
WINDOWS = (1, 2, 3)
WINDOW_STEP = 3  # k = 0, 3, 6, ...
PAPER_LAYERS = (24,)  # where our random is half-way back on capitals; faithful mode reruns every step


@dataclass(frozen=True)
class Condition:
    part: str  # "baseline", "sink", "windows" or "paper"
    kind: str
    k: int
    seed: int | None = None
    spare_first: int = 0
    window: int | None = None
    fresh_noise: bool = False

    @property
    def name(self) -> str:
        """A key for the records: kind, k and whatever variant is set."""
        parts = [self.kind, f"k={self.k}"]
        parts += [f"seed={self.seed}"] if self.seed is not None else []
        parts += [f"spare={self.spare_first}"] if self.spare_first else []
        parts += [f"w={self.window}"] if self.window else []
        parts += ["fresh"] if self.fresh_noise else []
        return " ".join(parts)

    @property
    def curve(self) -> str:
        """The curve this condition is a point of (seeds pooled)."""
        if self.part == "windows":
            return f"skip_attention w={self.window}"
        if self.part == "paper":
            return "random, fresh noise each step (paper)"
        return self.kind + (f", spare_first={self.spare_first}" if self.spare_first else "")

    def manipulation(self) -> Manipulation | None:
        if self.part == "baseline":
            return None
        return Manipulation(self.kind, self.k, seed=self.seed or 0, spare_first=self.spare_first, window=self.window,
                            fresh_noise_each_step=self.fresh_noise)

    @property
    def mode(self) -> str:
        return "faithful" if self.fresh_noise else "cached"


def conditions(task: str, L: int) -> list[Condition]:
    runs = [Condition("baseline", "baseline", L)]
    for k in SINK_LAYERS[task]:
        for spare in (0, 1):
            runs += [Condition("sink", "random", k, seed, spare_first=spare) for seed in SEEDS]
            runs += [Condition("sink", "freeze", k, spare_first=spare)]
            runs += [Condition("sink", "skip_attention", k, spare_first=spare)]
    if task != "capitals":
        return runs
    for w in WINDOWS:
        runs += [Condition("windows", "skip_attention", k, window=w) for k in range(0, L - w + 1, WINDOW_STEP)]
    for k in PAPER_LAYERS:
        runs += [Condition("paper", "random", k, seed, fresh_noise=True) for seed in SEEDS]
    return runs


# ----------------------------------------------------------------------------- running

def answer_has_ended(text: str, stop) -> bool:
    answer = text.lstrip()
    return any(s and s in answer for s in stop)


PARTS = ("baseline", "sink", "windows", "paper")


def read_records(out: Path, pattern: str = "records-*.jsonl") -> list[dict]:
    """The records of these files; a last line without its newline (a run killed mid-write) is not one."""
    return [json.loads(line) for path in sorted(out.glob(pattern)) for line in path.read_text().split("\n")[:-1]]


def run_task(model, tokenizer, name: str, out: Path, parts=PARTS) -> None:
    task = get_task(name, LIMITS[name])
    L = model.config.num_layers
    done = {(r["task"], r["condition"], r["example"]) for r in read_records(out, f"records-{name}-*.jsonl")}
    examples = list(task.examples)
    prompts = [tokenizer.encode(task.prompt(example)) for example in examples]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # little padding
    batches = [order[i:i + BATCH[name]] for i in range(0, len(order), BATCH[name])]
    states = {}  # (mode, batch index) -> PromptStates, shared by every condition of that batch
    todo = [c for c in conditions(name, L)
            if c.part in parts and any((name, c.name, e.id) not in done for e in examples)]
    print(f"{name}: {len(todo)} conditions to run, {len(examples)} examples", file=sys.stderr)
    for number, condition in enumerate(todo, 1):
        # one file per task and part: processes running different parts can share the folder
        with open(out / f"records-{name}-{condition.part}.jsonl", "a", encoding="utf-8") as log:
            manipulation = condition.manipulation()
            for b, batch in enumerate(batches):
                key = (condition.mode, b)
                if key not in states:
                    states[key] = PromptStates.compute(model, [prompts[i] for i in batch], task.max_new_tokens,
                                                       pad_id=tokenizer.pad_id, mode=condition.mode)
                result = generate_tokens(
                    model, [prompts[i] for i in batch], task.max_new_tokens, eos_ids=tokenizer.eos_ids,
                    pad_id=tokenizer.pad_id, manipulation=manipulation, mode=condition.mode,
                    stop=lambda new: answer_has_ended(tokenizer.decode(new), task.stop),
                    prompt_states=states[key], efficient=condition.mode == "cached")
                for i, tokens in zip(batch, result.tokens):
                    generation = tokenizer.decode(tokens)
                    record = {"task": name, "example": examples[i].id, "condition": condition.name,
                              "part": condition.part, "curve": condition.curve, "kind": condition.kind,
                              "k": condition.k, "seed": condition.seed, "spare_first": condition.spare_first,
                              "window": condition.window, "mode": condition.mode, "num_layers": L,
                              "metric": task.primary, "generation": generation,
                              "prediction": task.postprocess(generation),
                              "score": task.score(generation, examples[i])[task.primary],
                              "manipulation": None if manipulation is None else manipulation.to_dict()}
                    log.write(json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()
            print(f"{name} [{number}/{len(todo)}] {condition.name}", file=sys.stderr)


# ----------------------------------------------------------------------------- summary

def summarize(out: Path) -> dict:
    records = read_records(out)
    # task -> curve -> k -> example -> [scores over seeds]
    table = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    seeds_of = defaultdict(set)
    plan = {task: conditions(task, max(r["num_layers"] for r in records)) for task in LIMITS}
    planned = {(task, c.name) for task, runs in plan.items() for c in runs}
    seeded_curves = {c.curve for runs in plan.values() for c in runs if c.seed is not None}
    planned_seeds = defaultdict(lambda: 1, dict.fromkeys(seeded_curves, len(SEEDS)))
    for r in records:
        if (r["task"], r["condition"]) not in planned:
            continue  # left by an earlier plan
        table[r["task"]][r["curve"]][r["k"]][r["example"]].append(r["score"])
        if r["seed"] is not None:
            seeds_of[(r["task"], r["curve"])].add(r["seed"])
    summary = {"tasks": {}, "intervals": "95%, evals.stats: Wilson (one deterministic run) or a bootstrap over "
                                         "examples of the seed mean (random); differences paired by example "
                                         "(Newcombe for two deterministic runs, else a paired bootstrap)"}
    rows = []
    for task, curves in table.items():
        baseline_examples = curves["baseline"][max(curves["baseline"])]
        L = max(curves["baseline"])
        examples = sorted(baseline_examples)
        base = float(np.mean([baseline_examples[e][0] for e in examples]))
        # "kept": the share of the answers the model gets right unmanipulated that stay right
        right = np.array([baseline_examples[e][0] == 1.0 for e in examples])
        task_summary = {"n": len(examples), "num_layers": L, "baseline": base,
                        "baseline_ci": stats.wilson(int(right.sum()), len(examples)), "n_right": int(right.sum()),
                        "curves": {}}
        per_example = {}  # (curve, k) -> ([n] seed-mean per example, whether seeds were averaged)
        for curve, points in curves.items():
            if curve == "baseline":
                continue
            seeded = len(seeds_of[(task, curve)]) > 1
            entries = []
            for k in sorted(points):
                by_example = points[k]
                if sorted(by_example) != examples or any(len(by_example[e]) != planned_seeds[curve] for e in examples):
                    continue  # an unfinished condition
                values = np.array([np.mean(by_example[e]) for e in examples])
                per_example[(curve, k)] = values, seeded
                low, high = stats.interval(values.tolist(), binary=not seeded)
                kept_low, kept_high = stats.interval(values[right].tolist(), binary=not seeded)
                entry = {"k": k, "k/L": k / L, "score": float(values.mean()), "low95": low, "high95": high,
                         "n": len(examples), "seeds": len(by_example[examples[0]]),
                         "kept": float(values[right].mean()), "kept_low95": kept_low, "kept_high95": kept_high,
                         "n_right": int(right.sum())}
                if seeded:
                    entry["per_seed"] = [float(np.mean([by_example[e][s] for e in examples]))
                                         for s in range(len(by_example[examples[0]]))]
                entries.append(entry)
                rows.append({"task": task, "curve": curve, **{key: entry[key] for key in COLUMNS[2:]}})
            recovers = None if " w=" in curve else recovery(entries, base, L)  # a window has no "from k up"
            task_summary["curves"][curve] = {"points": entries, "recovers_from_k": recovers}
        task_summary["spared_minus_original"] = spared_minus_original(per_example)
        task_summary["paper_minus_ours"] = paper_vs_ours(per_example)
        summary["tasks"][task] = task_summary
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    draw(summary, out)
    return summary


COLUMNS = ["task", "curve", "k", "k/L", "score", "low95", "high95", "n", "seeds", "kept", "kept_low95",
           "kept_high95", "n_right"]


def recovery(entries: list[dict], baseline: float, L: int) -> int:
    """The smallest measured k from which every measured point keeps RECOVERY (90%) of the baseline (L: none)."""
    first = L
    for entry in sorted(entries, key=lambda e: -e["k"]):
        if entry["score"] < RECOVERY * baseline:
            break
        first = entry["k"]
    return first


def paired_difference(first: tuple[np.ndarray, bool], second: tuple[np.ndarray, bool]) -> dict:
    """mean(first) - mean(second) over the same examples, with its 95% interval."""
    (a, a_seeded), (b, b_seeded) = first, second
    difference, low, high = stats.paired_difference(a.tolist(), b.tolist(), binary=not (a_seeded or b_seeded))
    return {"difference": difference, "low95": low, "high95": high, "n": len(a)}


def spared_minus_original(per_example: dict) -> dict:
    """For each kind and k: spare_first=1 minus the paper's (spare_first=0), per example, paired."""
    suffix = ", spare_first=1"
    result = {}
    for (curve, k), values in per_example.items():  # values: (scores, seeded)
        if not curve.endswith(suffix):
            continue
        original = curve.removesuffix(suffix)
        if (original, k) in per_example:
            result.setdefault(original, []).append({"k": k, **paired_difference(values, per_example[(original, k)])})
    return result


def paper_vs_ours(per_example: dict) -> list[dict]:
    paper = "random, fresh noise each step (paper)"
    return [{"k": k, **paired_difference(values, per_example[("random", k)])}
            for (curve, k), values in sorted(per_example.items()) if curve == paper and ("random", k) in per_example]


def draw(summary: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    figure, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.6 * len(tasks)), squeeze=False)
    for row, (task, info) in enumerate(tasks.items()):
        L = info["num_layers"]
        for axis, kind in zip(axes[row], ("random", "freeze", "skip_attention")):
            for curve, colour in ((kind, "tab:gray"), (f"{kind}, spare_first=1", "tab:purple")):
                points = info["curves"].get(curve, {}).get("points", [])
                ks = [p["k"] / L for p in points]
                axis.plot(ks, [p["score"] for p in points], marker="o", markersize=3, color=colour, label=curve)
                axis.fill_between(ks, [p["low95"] for p in points], [p["high95"] for p in points], color=colour,
                                  alpha=0.15)
            axis.axhline(info["baseline"], color="black", linestyle="--", linewidth=0.8, label="baseline")
            axis.set_title(f"{task}: {kind} (n = {info['n']})")
            axis.set_xlabel("k / L")
            axis.set_ylim(-0.02, 1.02)
            axis.legend(fontsize=7)
        axes[row][0].set_ylabel(f"exact match (95% CI), {task}")
    figure.tight_layout()
    figure.savefig(out / "sink.png", dpi=120)
    plt.close(figure)
    windows = tasks.get("capitals", {}).get("curves", {})
    cells = {(p["k"], w): p for w in WINDOWS for p in windows.get(f"skip_attention w={w}", {}).get("points", [])}
    if cells:
        info = tasks["capitals"]
        plot_window_heatmap(cells, info["baseline"], info["num_layers"], out / "windows.png",
                            title=f"capitals (n = {info['n']}): skip_attention on layers k .. k+w-1 only")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(LIMITS), action="append", help="default: both")
    parser.add_argument("--part", choices=PARTS, action="append", help="default: all (parts of one task can run "
                                                                       "side by side in separate processes)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--summarize", action="store_true", help="only summarise the records already there")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        torch.set_num_threads(1)
        model, tokenizer = minillm.load("smollm2-135m")
        with torch.no_grad():
            for task in args.task or list(LIMITS):
                run_task(model, tokenizer, task, args.out, args.part or PARTS)
    summary = summarize(args.out)
    for task, info in summary["tasks"].items():
        print(f"{task}: baseline {info['baseline']:.3f} (n = {info['n']})")
        for curve, data in info["curves"].items():
            print(f"  {curve:45s} recovers from k = {data['recovers_from_k']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
