"""The `minillm` command line, harness included: the library's `generate` plus the eval commands.

    minillm generate PROMPT          continue a prompt, optionally with a manipulation
    minillm sweep ...                score tasks while manipulating from layer k up, for many k
    minillm swap ...                 the swap experiment (a country token given another country's state)
    minillm report DIR               figures and a markdown report for a run directory
    minillm reproduce                all of the above on the embedded SmolLM2, in about 15 minutes on 2 cores

The console script starts here, at the top of the stack: the library's parser (`minillm.cli`) is
given `register_harness_commands`, so the library itself never imports the harness.
"""

from __future__ import annotations

import argparse
import os
import sys

import minillm.cli
from evals.task_options import add_task_arguments, count_argument, register_task_commands
from minillm.cli import add_model_arguments, load_from_arguments

# `minillm reproduce` on the embedded SmolLM2-135M, sized for about 15 minutes on an idle 2-core machine.
# CPU seconds per example for 16 conditions, measured side by side (AMD EPYC, 1 thread): capitals 1.7,
# context-qa 5.3, fanoutqa 2.5, summarization 34. The old defaults (40/16/40/8) took 8.0 min of sweep idle,
# so 15 min (less 0.9 for the swap) buys about 1.7 times their cost. For the narrowest intervals overall, each
# task gets examples in proportion to its score's spread over the square root of its cost (capitals and
# context-qa exact match, spread ~0.45; fanoutqa F1 ~0.3; summarization ROUGE-L ~0.07), with summarization
# kept at 8 articles, below which its bootstrap intervals mean little. Expected 95% half-widths of the
# baselines: capitals ~0.09, context-qa ~0.11, fanoutqa ~0.08, summarization ~0.04.
REPRODUCE_LIMITS = {"capitals": 100, "context-qa": 56, "fanoutqa": 60, "summarization": 8}
REPRODUCE_KINDS = ("random", "freeze", "skip_attention")
REPRODUCE_LAYERS = "0::3"  # every 3rd layer from 0, and always k = L (the baseline)
REPRODUCE_SWAP_LAYERS = "all"  # cheap: 60-token prompts, answers of a few tokens
# `reproduce --quick`: the whole pipeline on a handful of examples, in under 2 minutes on 2 cores.
QUICK_LIMITS = {"capitals": 6, "context-qa": 2, "fanoutqa": 6, "summarization": 1}
QUICK_LAYERS = "0::15"  # k = 0, 15 and the baseline
QUICK_SWAP_LIMIT = 40

LIMIT_HELP = "N examples of each task, spread evenly over it (every len/N-th, from the first)"


def comma_list(text: str) -> list[str]:
    """Items of a comma-separated list, each once, in order ('capitals,capitals' is 'capitals')."""
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


def tasks_from(names: list[str], limits: dict[str, int | None]):
    """Built-in tasks by name, each cut to its limit (examples spread evenly over the task)."""
    from evals.results import SweepError
    from evals.tasks import TASKS, evenly_spaced, get_task

    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SweepError(f"unknown task {unknown[0]!r}; built-in tasks: {', '.join(TASKS)}")
    return [evenly_spaced(get_task(name), limits[name]) for name in names]


def device_of_this_rank(device: str) -> str:
    """Under torchrun, plain 'cuda' means this process's own GPU (LOCAL_RANK); anything else is kept."""
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{local_rank}" if device == "cuda" and local_rank is not None else device


def cmd_sweep(args: argparse.Namespace) -> None:
    from evals.report import results_table
    from evals.results import claimed_folder
    from evals.sweep import LayerGrid, Shard, check_kinds, run_sweep
    from evals.task_options import tasks_from_arguments

    kinds = comma_list(args.manipulation)
    check_kinds(kinds)
    grid, shard = LayerGrid.parse(args.layers), Shard.parse(args.shard)
    tasks = tasks_from_arguments(args)  # every data file is read and checked before the model loads
    args.device = device_of_this_rank(args.device)
    with claimed_folder(args.out, shard.filename):  # refuses a second writer before the model loads
        model, tokenizer = load_from_arguments(args)
        batch_size = resolved_batch_size(args, model, tokenizer, tasks)
        result = run_sweep(model, tokenizer, tasks, kinds, grid, args.out, model_name=args.model, seeds=args.seeds,
                           batch_size=batch_size, pack_tokens=resolved_pack_tokens(args, tokenizer, tasks, batch_size), shard=shard)
    print(results_table(result.summaries))
    part = "" if shard.count == 1 else f" (shard {shard.index}/{shard.count} only: `minillm report` merges the shards)"
    print(f"results: {result.path}{part}")


def cmd_swap(args: argparse.Namespace) -> None:
    from evals.results import SweepError, claimed_folder
    from evals.swap import SWAP_FILE, run_swap, swap_task
    from evals.sweep import LayerGrid

    grid = LayerGrid.parse(args.layers)
    if args.limit is not None and args.limit < 2:
        raise SweepError(f"--limit must be at least 2 countries, got {args.limit}")
    with claimed_folder(args.out, SWAP_FILE):
        model, tokenizer = load_from_arguments(args)
        batch_size = resolved_batch_size(args, model, tokenizer, [swap_task(args.limit)])
        path = run_swap(model, tokenizer, grid, args.out, model_name=args.model, limit=args.limit,
                        batch_size=batch_size, seed=args.seed)
    print(f"results: {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from evals.report import write_report

    print(f"report: {write_report(args.dir)}")


def cmd_reproduce(args: argparse.Namespace) -> None:
    import json
    import time
    from pathlib import Path

    from evals.aggregate import aggregate
    from evals.report import TIMING_FILE, headline_intervals, write_report
    from evals.results import SweepError, claimed_folder, load_results
    from evals.swap import SWAP_FILE, run_swap
    from evals.sweep import LayerGrid, Shard, run_sweep

    defaults = QUICK_LIMITS if args.quick else REPRODUCE_LIMITS
    limits = {name: limit if args.limit is None else args.limit for name, limit in defaults.items()}
    layers = args.layers or (QUICK_LAYERS if args.quick else REPRODUCE_LAYERS)
    swap_layers = args.layers or (QUICK_LAYERS if args.quick else REPRODUCE_SWAP_LAYERS)
    swap_limit = args.limit if args.limit is not None else (QUICK_SWAP_LIMIT if args.quick else None)
    if swap_limit is not None and swap_limit < 2:
        raise SweepError(f"--limit must be at least 2 (the swap experiment pairs countries), got {swap_limit}")
    out = args.out or ("results/reproduce-quick" if args.quick else "results/reproduce")
    grid, swap_grid = LayerGrid.parse(layers), LayerGrid.parse(swap_layers)
    tasks = tasks_from(list(limits), limits)
    with claimed_folder(out, Shard().filename), claimed_folder(out, SWAP_FILE):
        started = time.perf_counter()
        model, tokenizer = load_from_arguments(args)
        batch_size = resolved_batch_size(args, model, tokenizer, tasks)  # the swap's prompts are shorter
        run_sweep(model, tokenizer, tasks, REPRODUCE_KINDS, grid, out, model_name=args.model, seeds=args.seeds,
                  batch_size=batch_size, pack_tokens=resolved_pack_tokens(args, tokenizer, tasks, batch_size))
        swept = time.perf_counter()
        run_swap(model, tokenizer, swap_grid, out, model_name=args.model, limit=swap_limit, batch_size=batch_size)
        swapped = time.perf_counter()
        # Run time is kept apart from the results, which must be the same bytes on every run.
        settings = {name: value for name, value in vars(args).items() if name not in ("run", "command")}
        timing = {"settings": settings | {"out": out, "layers": layers, "swap_layers": swap_layers, "limits": limits,
                                          "swap_limit": swap_limit},
                  "sweep_s": round(swept - started, 1), "swap_s": round(swapped - swept, 1),
                  "total_s": round(swapped - started, 1),
                  "cpu_s": round(time.process_time(), 1)}  # all threads' CPU time: wall time on a busy machine misleads
        Path(out, TIMING_FILE).write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
    print(f"report: {write_report(out)}")
    print("95% half-widths:")
    print("\n".join(headline_intervals(aggregate(load_results(out).values()))))
    print(f"took {timing['total_s'] / 60:.1f} min" + (" (smoke run: --quick)" if args.quick else ""))


def batch_size_argument(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def resolved_batch_size(args: argparse.Namespace, model, tokenizer, tasks) -> int:
    """--batch-size as a number: 'auto' sized now that the model is loaded (and said on stderr)."""
    from evals.sweep import auto_batch_size

    if args.batch_size != "auto":
        return args.batch_size
    size = auto_batch_size(model, tokenizer, tasks)
    print(f"--batch-size auto: {size}", file=sys.stderr)
    return size


def resolved_pack_tokens(args: argparse.Namespace, tokenizer, tasks, batch_size: int) -> int:
    """--pack-tokens; with --batch-size auto, at most the cache slots of the batch it found (whose memory budget
    counts a whole cache per sequence, and the shared prompt states' beside it)."""
    from evals.sweep import longest_sequence

    if args.batch_size != "auto":
        return args.pack_tokens
    return min(args.pack_tokens, batch_size * sum(longest_sequence(tokenizer, tasks)))


def add_pack_argument(parser: argparse.ArgumentParser) -> None:
    from minillm.packed import PACK_TOKENS

    parser.add_argument("--pack-tokens", type=count_argument(1), default=PACK_TOKENS,
                        help="decode the conditions of one kind together while their KV caches hold at most this "
                             "many token slots (rows x positions); 1: each condition alone; with --batch-size auto, "
                             "at most that batch's (default %(default)s)")


def add_sweep_arguments(parser: argparse.ArgumentParser, batch_size: int, layers: str | None = "all") -> None:
    default = (f"sweep {REPRODUCE_LAYERS}, swap {REPRODUCE_SWAP_LAYERS}; --quick: {QUICK_LAYERS}" if layers is None
               else "%(default)s")
    parser.add_argument("--layers", default=layers,
                        help="k values: 'all' or START:STOP:STEP, STOP included, empty STOP = L (e.g. 0:30:3, 0::3); "
                             f"the baseline k = L is always run (default: {default})")
    parser.add_argument("--batch-size", type=batch_size_argument, default=batch_size,
                        help="prompts generated together; 'auto': the largest batch that fits the device's memory "
                             "(half the available RAM on the CPU) for the longest prompt, recorded in run.json")


def register_harness_commands(commands) -> None:
    """Add sweep, swap, report and reproduce to the subparsers object of `minillm.cli.build_parser`."""
    sweep = commands.add_parser(
        "sweep", help="score tasks with previous tokens manipulated from layer k up, for many k",
        description="Run model x task x manipulation x k (x seed), one JSON line per answer in OUT/results.jsonl. "
                    "Rerunning the same command continues an interrupted run. swap is not a sweep kind (it needs a "
                    "donor state per prompt): use `minillm swap`.")
    add_model_arguments(sweep)
    sweep.add_argument("--manipulation", required=True,
                       help="comma-separated kinds: random, freeze, skip_attention (freeze's k=0 runs as k=1); "
                            "swap needs donors: use `minillm swap`")
    add_sweep_arguments(sweep, batch_size=16)
    add_pack_argument(sweep)
    add_task_arguments(sweep)  # --task or --data/--hf-dataset, prompts, --limit
    sweep.add_argument("--seeds", type=int, default=1, help="random: seeds 0..N-1 (other kinds are deterministic)")
    sweep.add_argument("--out", required=True, help="run directory (created; resumed if it holds results)")
    sweep.add_argument("--shard", default="1/1",
                       help="I/N, I counted from 1 (1/4 ... 4/4): run the I-th of N deterministic parts into "
                            "results.shard-I-of-N.jsonl; 'auto': I and N from torchrun (RANK, WORLD_SIZE) or a Slurm "
                            "job array (see docs/cluster.md)")
    sweep.set_defaults(run=cmd_sweep)

    swap = commands.add_parser(
        "swap", help="the swap experiment: a country token given another country's hidden state at layer k",
        description="For country pairs the model answers correctly, replace the recipient country's token state at "
                    "layer k by the donor's (from 'The country X') and record whether the original or the injected "
                    "capital comes out, in OUT/swap.jsonl.")
    add_model_arguments(swap)
    add_sweep_arguments(swap, batch_size=32)
    swap.add_argument("--limit", type=int, help="N countries, spread evenly over the capitals data (default: all)")
    swap.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    swap.add_argument("--out", required=True, help="run directory (created; resumed if it holds results)")
    swap.set_defaults(run=cmd_swap)

    report = commands.add_parser("report", help="figures and report.md for a run directory")
    report.add_argument("dir", help="a directory written by sweep / swap / reproduce")
    report.set_defaults(run=cmd_report)

    reproduce = commands.add_parser(
        "reproduce", help="the paper's figures in one command (about 15 min on 2 CPU cores with SmolLM2-135M)",
        description="Sweep capitals, context-qa, fanoutqa and summarization under random, freeze and skip_attention, "
                    "run the swap experiment, and write figures and report.md into OUT. Interrupted? Run it again: "
                    "it continues. For a 7B model on a GPU: minillm reproduce --model meta-llama/Llama-2-7b-hf "
                    "--dtype bfloat16 --device cuda --limit 200 --layers all --out results/llama-2-7b")
    add_model_arguments(reproduce)
    add_sweep_arguments(reproduce, batch_size=16, layers=None)
    add_pack_argument(reproduce)
    reproduce.add_argument("--limit", type=int, help=LIMIT_HELP + ", and N countries for the swap (default: "
                           + ", ".join(f"{task} {n}" for task, n in REPRODUCE_LIMITS.items()) + "; all countries)")
    reproduce.add_argument("--seeds", type=int, default=1, help="random: seeds 0..N-1")
    reproduce.add_argument("--quick", action="store_true",
                           help="smoke run: the whole pipeline on a handful of examples (under 2 min on 2 cores); "
                                "its report says so")
    reproduce.add_argument("--out", help="run directory (default: results/reproduce, results/reproduce-quick "
                                         "with --quick)")
    reproduce.set_defaults(run=cmd_reproduce)


def main(argv: list[str] | None = None) -> int:
    return minillm.cli.main(argv, register=(register_harness_commands, register_task_commands))


if __name__ == "__main__":
    sys.exit(main())
