"""The library's command line: `minillm generate PROMPT` continues a prompt, optionally manipulated.

The `minillm` console script starts one level up, in the harness (`evals.cli`), which adds its
commands (sweep, swap, report, reproduce, tasks) through `main`'s `register` hook: the library never
imports the harness.

An error ends the command with one line on stderr and exit status 2; add --debug to any
command (or set MINILLM_DEBUG=1) to see the traceback as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

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


def load_from_arguments(args: argparse.Namespace):
    """The model and tokenizer that --model/--dtype/--device name, on --threads CPU threads, once every
    argument that can be checked without them has been."""
    import torch

    import minillm

    check_model_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return minillm.load(args.model, dtype=args.dtype, device=args.device)


def check_compile(args: argparse.Namespace) -> None:
    """--compile compiles the cached decode step; on the CPU, torch.compile builds C++ with $CXX, or g++
    (clang++ on macOS), as torch's inductor looks for it."""
    import os
    import shutil
    import sys

    import torch

    if args.mode != "cached":
        raise ValueError("--compile compiles the cached decode step: it needs --mode cached")
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    if torch.device(args.device).type == "cpu" and shutil.which(compiler) is None:
        raise ValueError(f"--compile on the CPU needs a C++ compiler: torch.compile builds C++ with {compiler} "
                         f"($CXX), which is not on PATH")


def cmd_generate(args: argparse.Namespace) -> None:
    import minillm
    from minillm.checkpoint import load_config
    from minillm.errors import ManipulationError, UsageError
    from minillm.generate import Sampling
    from minillm.inputs import (
        check_count,
        check_prompt_texts,
        check_temperature,
        check_top_p,
    )
    from minillm.manipulation import check_layers

    check_model_arguments(args)  # before the checks below, so that the first bad flag is named
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
    if args.compile:
        check_compile(args)
    variant_flags = args.spare_first is not None or args.window is not None
    if variant_flags and (not args.manipulation or takes_donor):
        raise ValueError("--spare-first and --window only apply with --manipulation random, freeze or skip_attention")
    if takes_donor and None in (args.donor_prompt, args.position):
        raise ValueError(f"--manipulation {args.manipulation} needs --donor-prompt TEXT and --position J")
    if not takes_donor and any(flag is not None for flag in donor_flags):
        raise ValueError("--donor-prompt, --donor-position and --position only apply with --manipulation swap")
    if args.manipulation:  # a layer past the top is refused from config.json, before the weights load
        try:
            check_layers(args.manipulation, args.layer, args.window, load_config(args.model).num_layers)
        except ManipulationError as error:
            raise UsageError(f"--layer {args.layer}: {error}") from None
    model, tokenizer = load_from_arguments(args)
    manipulation = None
    if takes_donor:
        manipulation = donor_manipulation(model, tokenizer, args)
    elif args.manipulation:
        manipulation = minillm.Manipulation(args.manipulation, args.layer, seed=args.seed,
                                            spare_first=args.spare_first or 0, window=args.window)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    def write(text: str) -> None:
        print(text, end="", flush=True)

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

    k = args.layer
    donor_ids = tokenizer.encode(args.donor_prompt)
    donor_position = -1 if args.donor_position is None else args.donor_position
    if not -len(donor_ids) <= donor_position < len(donor_ids):
        raise ValueError(f"--donor-position {donor_position} is outside the donor prompt's {len(donor_ids)} tokens")
    with torch.no_grad():
        states = model.residual_stream(torch.tensor([donor_ids], device=model.embed_tokens.weight.device))
    vector = states[k][0, donor_position][None]  # [1, D]
    return Manipulation(args.manipulation, k, positions=(args.position,), vectors=vector,
                        description=f"position {donor_position} of {args.donor_prompt!r} at layer {k}")

def build_parser(register: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    """The parser with `generate`, then the commands each function of `register` adds to the subparsers."""
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
    gen.add_argument("--spare-first", type=int, metavar="N",
                     help="random, freeze, skip_attention: leave each sequence's first N tokens alone "
                          "(1 spares the attention sink of a model without BOS)")
    gen.add_argument("--window", type=int, metavar="W",
                     help="freeze, skip_attention: act on layers k .. k+W-1 only, not k to the top")
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling and for random vectors")
    gen.add_argument("--mode", choices=MODES, default="cached",
                     help="cached: KV cache; faithful: rerun the whole sequence each step (the paper's way)")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step with torch.compile, for fixed shapes (CUDA graphs on a GPU; on "
                          "the CPU, weights packed ahead, a second copy in memory, and a C++ compiler needed; the "
                          "first call compiles: worth it for long outputs)")
    gen.set_defaults(run=cmd_generate)

    for add_commands in register:
        add_commands(commands)
    return parser

def main(argv: list[str] | None = None, register: Sequence[Callable] = ()) -> int:
    """Run one command; `register`: functions that each add commands to the argparse subparsers object."""
    debug, argv = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    try:
        args = build_parser(register).parse_args(argv)
    except SystemExit as exit:  # --help, or a bad flag (already reported in one line by OneLineErrorParser)
        return exit.code
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
