"""The library's command line: `minillm generate PROMPT` continues a prompt, optionally manipulated.

The `minillm` console script starts one level up, in the harness (`evals.cli`), which adds its
commands (sweep, swap, report, reproduce) through `main`'s `register` hook: the library never
imports the harness.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from minillm.manipulation import KINDS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name, local folder, or org/name in the local Hugging Face cache")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def load_from_arguments(args: argparse.Namespace):
    """The model and tokenizer that --model/--dtype/--device name, on --threads CPU threads."""
    import torch

    import minillm

    if args.threads:
        torch.set_num_threads(args.threads)
    return minillm.load(args.model, dtype=args.dtype, device=args.device)


def cmd_generate(args: argparse.Namespace) -> None:
    import minillm
    from minillm.generate import Sampling

    manipulation = None
    if args.manipulation:
        if args.layer is None:
            raise ValueError("--manipulation needs --layer K (the first decoder layer whose view is altered)")
        manipulation = minillm.Manipulation(args.manipulation, args.layer, seed=args.seed)
    elif args.layer is not None:
        raise ValueError("--layer only applies with --manipulation")
    model, tokenizer = load_from_arguments(args)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    write = lambda text: print(text, end="", flush=True)  # noqa: E731
    minillm.generate(model, tokenizer, args.prompt, args.max_new_tokens, sampling=sampling,
                     manipulation=manipulation, mode=args.mode, chat=args.chat, stream=write)
    print()


def build_parser(register: Sequence[Callable] = ()) -> argparse.ArgumentParser:
    """The parser with `generate`, then the commands each function of `register` adds to the subparsers."""
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__,
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
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling and for random vectors")
    gen.add_argument("--mode", choices=("cached", "faithful"), default="cached",
                     help="cached: KV cache; faithful: rerun the whole sequence each step (the paper's way)")
    gen.set_defaults(run=cmd_generate)
    for add_commands in register:
        add_commands(commands)
    return parser


def main(argv: list[str] | None = None, register: Sequence[Callable] = ()) -> int:
    """Run one command; `register`: functions that each add commands to the argparse subparsers object."""
    from minillm.assets import AssetError

    args = build_parser(register).parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, AssetError) as error:  # bad input or a missing asset: one line, no traceback
        print(f"minillm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
