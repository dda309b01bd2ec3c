"""The `minillm` command line.

    minillm generate PROMPT          continue a prompt, optionally with a manipulation
    minillm sweep ...                score tasks while manipulating from layer k up, for many k
    minillm swap ...                 the swap experiment (a country token given another country's state)
    minillm report DIR               figures and a markdown report for a run directory
    minillm reproduce                all of the above on the embedded SmolLM2, in about 15 minutes on 2 cores

An error ends the command with one line on stderr and exit status 2; add --debug to any
command (or set MINILLM_DEBUG=1) to see the traceback as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from minillm.generate import MODES
from minillm.manipulation import KIND_FACTS, KINDS


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other minillm error (not usage + error)."""

    def error(self, message: str):
        self.exit(2, f"minillm: error: {message} (see: {self.prog} --help)\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name, local folder, or org/name in the local Hugging Face cache")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the default: the checkpoint's own dtype on a GPU, float32 on the CPU), "
                             "float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse a bad --model, --dtype, --device or --threads before anything is loaded."""
    from minillm.api import parse_dtype
    from minillm.errors import UsageError
    from minillm.inputs import check_device, check_threads

    if not args.model.strip():
        raise UsageError("--model is empty: give an embedded name, a folder or org/name")
    if args.dtype != "auto":
        parse_dtype(args.dtype, "--dtype")
    check_device(args.device, "--device")
    check_threads(args.threads, "--threads")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    import minillm
    from minillm.generate import Sampling
    from minillm.inputs import (
        check_count,
        check_prompt_texts,
        check_temperature,
        check_top_p,
    )

    check_model_arguments(args)
    check_temperature(args.temperature, "--temperature")
    check_top_p(args.top_p, "--top-p")
    check_count(args.top_k, "--top-k")
    check_count(args.max_new_tokens, "--max-new-tokens")
    check_prompt_texts(args.prompt, "the prompt")
    donor_flags = (args.donor_prompt, args.donor_position, args.position)
    takes_donor = args.manipulation is not None and KIND_FACTS[args.manipulation].donor
    if args.manipulation:
        if args.layer is None:
            raise ValueError("--manipulation needs --layer K (the first decoder layer whose view is altered)")
    elif args.layer is not None:
        raise ValueError("--layer only applies with --manipulation")
    if takes_donor and None in (args.donor_prompt, args.position):
        raise ValueError(f"--manipulation {args.manipulation} needs --donor-prompt TEXT and --position J")
    if not takes_donor and any(flag is not None for flag in donor_flags):
        raise ValueError("--donor-prompt, --donor-position and --position only apply with --manipulation swap")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = minillm.load(args.model, dtype=args.dtype, device=args.device)
    manipulation = None
    if takes_donor:
        manipulation = donor_manipulation(model, tokenizer, args)
    elif args.manipulation:
        manipulation = minillm.Manipulation(args.manipulation, args.layer, seed=args.seed)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    write = lambda text: print(text, end="", flush=True)
    try:
        minillm.generate(model, tokenizer, args.prompt, args.max_new_tokens, sampling=sampling,
                         manipulation=manipulation, mode=args.mode, chat=args.chat, stream=write,
                         compile=args.compile)
    except KeyboardInterrupt:
        print()  # end the streamed line before the interruption is reported
        raise
    print()


def donor_manipulation(model, tokenizer, args: argparse.Namespace):
    """swap from the command line: the donor prompt's H[k] at --donor-position goes to --position of the prompt."""
    import torch

    from minillm.manipulation import Manipulation

    L, k = model.config.num_layers, args.layer
    if not 0 <= k <= L:
        raise ValueError(f"--layer {k} is outside 0..{L} for a {L}-layer model")
    donor_ids = tokenizer.encode(args.donor_prompt)
    donor_position = -1 if args.donor_position is None else args.donor_position
    if not -len(donor_ids) <= donor_position < len(donor_ids):
        raise ValueError(f"--donor-position {donor_position} is outside the donor prompt's {len(donor_ids)} tokens")
    with torch.no_grad():
        states = model.residual_stream(torch.tensor([donor_ids], device=model.embed_tokens.weight.device))
    vector = states[k][0, donor_position][None]  # [1, D]
    return Manipulation(args.manipulation, k, positions=(args.position,), vectors=vector,
                        description=f"position {donor_position} of {args.donor_prompt!r} at layer {k}")


# ----------------------------------------------------------------------------- sweeps and reports

# `minillm reproduce` on the embedded SmolLM2-135M: sized to finish in about 15 minutes on 2 CPU cores.
# Summarization costs the most per example (250-token articles, up to 100 new tokens), context-qa next.
REPRODUCE_LIMITS = {"capitals": 40, "context-qa": 16, "fanoutqa": 40, "summarization": 8}
REPRODUCE_KINDS = ("random", "freeze", "skip_attention")
REPRODUCE_LAYERS = "0::3"  # every 3rd layer from 0, and always k = L (the baseline)
REPRODUCE_SWAP_LAYERS = "all"  # cheap: 60-token prompts, answers of a few tokens


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def load_for_sweep(args: argparse.Namespace):
    """The model and tokenizer, after every argument that can be checked without them has been."""
    import torch

    import minillm

    if args.threads:
        torch.set_num_threads(args.threads)
    return minillm.load(args.model, dtype=args.dtype, device=args.device)


def tasks_from(names: list[str], limits: dict[str, int | None]):
    """Built-in tasks by name, each cut to its limit (examples spread evenly over the task)."""
    from evals.sweep import SweepError, evenly_spaced
    from evals.tasks import TASKS, get_task

    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise SweepError(f"unknown task {unknown[0]!r}; built-in tasks: {', '.join(TASKS)}")
    return [evenly_spaced(get_task(name), limits[name]) for name in names]


def cmd_sweep(args: argparse.Namespace) -> None:
    from evals.sweep import LayerGrid, Shard, check_kinds, run_sweep

    task_names, kinds = comma_list(args.task), comma_list(args.manipulation)
    check_kinds(kinds)
    grid, shard = LayerGrid.parse(args.layers), Shard.parse(args.shard)
    tasks = tasks_from(task_names, dict.fromkeys(task_names, args.limit))
    model, tokenizer = load_for_sweep(args)
    path = run_sweep(model, tokenizer, tasks, kinds, grid, args.out, model_name=args.model, seeds=args.seeds,
                     batch_size=args.batch_size, shard=shard)
    print(f"results: {path}")


def cmd_swap(args: argparse.Namespace) -> None:
    from evals.swap import run_swap
    from evals.sweep import LayerGrid, SweepError

    grid = LayerGrid.parse(args.layers)
    if args.limit is not None and args.limit < 2:
        raise SweepError(f"--limit must be at least 2 countries, got {args.limit}")
    model, tokenizer = load_for_sweep(args)
    path = run_swap(model, tokenizer, grid, args.out, model_name=args.model, limit=args.limit,
                    batch_size=args.batch_size, seed=args.seed)
    print(f"results: {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from evals.report import write_report

    print(f"report: {write_report(args.dir)}")


def cmd_reproduce(args: argparse.Namespace) -> None:
    import json
    import time
    from pathlib import Path

    from evals.report import TIMING_FILE, write_report
    from evals.swap import run_swap
    from evals.sweep import LayerGrid, run_sweep

    grid, swap_grid = LayerGrid.parse(args.layers), LayerGrid.parse(REPRODUCE_SWAP_LAYERS)
    limits = {name: limit if args.limit is None else args.limit for name, limit in REPRODUCE_LIMITS.items()}
    tasks = tasks_from(list(REPRODUCE_LIMITS), limits)
    started = time.perf_counter()
    model, tokenizer = load_for_sweep(args)
    run_sweep(model, tokenizer, tasks, REPRODUCE_KINDS, grid, args.out, model_name=args.model, seeds=args.seeds,
              batch_size=args.batch_size)
    swept = time.perf_counter()
    run_swap(model, tokenizer, swap_grid, args.out, model_name=args.model, batch_size=args.batch_size)
    swapped = time.perf_counter()
    # Run time is kept apart from the results, which must be the same bytes on every run.
    settings = {name: value for name, value in vars(args).items() if name not in ("run", "command")}
    timing = {"settings": settings | {"limits": limits}, "sweep_s": round(swept - started, 1),
              "swap_s": round(swapped - swept, 1), "total_s": round(swapped - started, 1),
              "cpu_s": round(time.process_time(), 1)}  # all threads' CPU time: wall time on a busy machine misleads
    Path(args.out, TIMING_FILE).write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
    print(f"report: {write_report(args.out)}")
    print(f"took {timing['total_s'] / 60:.1f} min")


def add_sweep_arguments(parser: argparse.ArgumentParser, batch_size: int, layers: str = "all") -> None:
    parser.add_argument("--layers", default=layers,
                        help="k values: 'all' or START:STOP:STEP, STOP included, empty STOP = L (e.g. 0:30:3, 0::3); "
                             "the baseline k = L is always run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="prompts generated together")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="minillm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="continue a prompt, streaming the output")
    add_model_arguments(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--manipulation", choices=KINDS, help="manipulate previous tokens from layer --layer up")
    gen.add_argument("--layer", type=int, help="k: the first decoder layer whose view of previous tokens is altered")
    gen.add_argument("--donor-prompt", help="swap: the prompt whose state at layer k is taken")
    gen.add_argument("--donor-position", type=int,
                     help="swap: the donor prompt's token whose H[k] is taken (default: -1, its last token)")
    gen.add_argument("--position", type=int,
                     help="swap: the prompt's token (0 = its first, counted after any chat wrapping) that gets it")
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling and for random vectors")
    gen.add_argument("--mode", choices=MODES, default="cached",
                     help="cached: KV cache; faithful: rerun the whole sequence each step (the paper's way)")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step with torch.compile (the first call compiles: worth it for long "
                          "outputs; needs a C++ compiler on the CPU)")
    gen.set_defaults(run=cmd_generate)

    sweep = commands.add_parser(
        "sweep", help="score tasks with previous tokens manipulated from layer k up, for many k",
        description="Run model x task x manipulation x k (x seed), one JSON line per answer in OUT/results.jsonl. "
                    "Rerunning the same command continues an interrupted run. swap is not a sweep kind (it needs a "
                    "donor state per prompt): use `minillm swap`.")
    add_model_arguments(sweep)
    sweep.add_argument("--task", required=True, help="comma-separated built-in tasks: capitals, context-qa, fanoutqa, "
                                                     "summarization")
    sweep.add_argument("--manipulation", required=True,
                       help="comma-separated kinds: random, freeze, skip_attention (freeze's k=0 runs as k=1); "
                            "swap needs donors: use `minillm swap`")
    add_sweep_arguments(sweep, batch_size=16)
    sweep.add_argument("--seeds", type=int, default=1, help="random: seeds 0..N-1 (other kinds are deterministic)")
    sweep.add_argument("--limit", type=int, help="N examples of each task, spread evenly over it (default: all)")
    sweep.add_argument("--out", required=True, help="run directory (created; resumed if it holds results)")
    sweep.add_argument("--shard", default="1/1",
                       help="I/N: run the I-th of N deterministic parts into results.shard-I-of-N.jsonl")
    sweep.set_defaults(run=cmd_sweep, resumable=True)

    swap = commands.add_parser(
        "swap", help="the swap experiment: a country token given another country's hidden state at layer k",
        description="For country pairs the model answers correctly, replace the recipient country's token state at "
                    "layer k by the donor's (from 'The country X') and record whether the original or the injected "
                    "capital comes out, in OUT/swap.jsonl.")
    add_model_arguments(swap)
    add_sweep_arguments(swap, batch_size=32)
    swap.add_argument("--limit", type=int, help="consider the first N countries (default: all)")
    swap.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    swap.add_argument("--out", required=True, help="run directory (created; resumed if it holds results)")
    swap.set_defaults(run=cmd_swap, resumable=True)

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
    add_sweep_arguments(reproduce, batch_size=16, layers=REPRODUCE_LAYERS)
    reproduce.add_argument("--limit", type=int, help="examples per task, spread evenly over it (default: "
                           + ", ".join(f"{task} {n}" for task, n in REPRODUCE_LIMITS.items()) + ")")
    reproduce.add_argument("--seeds", type=int, default=1, help="random: seeds 0..N-1")
    reproduce.add_argument("--out", default="results/reproduce", help="run directory (default: results/reproduce)")
    reproduce.set_defaults(run=cmd_reproduce, resumable=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug, argv = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        resume = "; run the same command again to continue" if getattr(args, "resumable", False) else ""
        print(f"minillm: interrupted{resume}", file=sys.stderr)
        return 130
    # Expected failures: minillm's own errors (MinillmError), the harness's (ValueErrors too) and the
    # operating system's. Anything else is a bug and keeps its traceback.
    except (ValueError, OSError) as error:
        if debug:
            traceback.print_exc()
        print(f"minillm: error: {describe_error(error)}", file=sys.stderr)
        return 2
    return 0


def split_debug_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether --debug (anywhere before a `--`) or MINILLM_DEBUG=1 asks for tracebacks; argv without it."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("MINILLM_DEBUG", "") not in ("", "0")
    return debug, [arg for i, arg in enumerate(argv) if not (i < end and arg == "--debug")]


def describe_error(error: Exception) -> str:
    """One line for an error; an OSError says which path (both paths of a failed rename or copy)."""
    if isinstance(error, OSError) and error.filename is not None:
        paths = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{paths}: {error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
