"""Command-line options that choose the tasks of a run and write their prompts.

    --task capitals,context-qa            built-in tasks (`minillm tasks` lists them)
    --data PATH [--format F] [--fields ROLE=FIELD,...] [--name NAME]
                                          a task from a user's file; repeat for more files
    --hf-dataset NAME[:CONFIG] [--split S] [--format F] [--fields ...] [--name NAME]
                                          a task from a Hugging Face dataset (needs `datasets`)
    --shots N [--seed S]                  N demonstrations drawn from each task's own data
    --template TEXT | @FILE               the prompt of one example, with named fields
    --max-new-tokens N                    the answer budget
    --chat                                prompts in the model's own chat template
    --limit N                             N examples of each task, spread evenly over it

--format, --fields, --name and --split describe the --data or --hf-dataset they follow, so one run can
mix a SQuAD file and a JSONL file with its own field names. The formats and roles are those of
`evals.loaders`. `add_task_arguments(parser)` adds the options; `tasks_from_arguments(args)` checks them
all and builds the tasks before any model is loaded (with --chat it reads the checkpoint's tokenizer,
which is small, for its chat template).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from evals.loaders import FORMATS, load_data, load_hf
from evals.tasks import TASKS, Task, describe_tasks, get_task, with_options
from minillm.tokenizer import Tokenizer

_NAME = re.compile(r"[\w.:\-\[\]]+")


def count_argument(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


class _NewSource(argparse.Action):
    """--data / --hf-dataset: a new source of examples, which the options after it describe."""

    def __call__(self, parser, namespace, value, option_string=None):
        sources = list(getattr(namespace, "sources", None) or [])
        sources.append({"option": option_string, "location": value, "format": None, "fields": None, "name": None,
                        "split": None})
        namespace.sources = sources


class _SourceOption(argparse.Action):
    """--format / --fields / --name / --split: a setting of the --data or --hf-dataset just before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        sources = getattr(namespace, "sources", None)
        if not sources:
            parser.error(f"{option_string} describes a --data or --hf-dataset: put it after the one it describes")
        source = sources[-1]
        if source[self.dest] is not None:
            parser.error(f"{option_string} is given twice for {source['option']} {source['location']}")
        if self.dest == "split" and source["option"] != "--hf-dataset":
            parser.error(f"--split applies to --hf-dataset, not to {source['option']} {source['location']}")
        source[self.dest] = value


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose tasks and prompts (see the module's docstring)."""
    group = parser.add_argument_group(
        "tasks and prompts", "--format, --fields, --name and --split describe the --data or --hf-dataset before them")
    group.add_argument("--task", help=f"comma-separated built-in tasks: {', '.join(TASKS)} (see `minillm tasks`)")
    group.add_argument("--data", action=_NewSource, metavar="PATH", default=argparse.SUPPRESS,
                       help="a task from your file (repeatable); formats: " + ", ".join(FORMATS))
    group.add_argument("--hf-dataset", action=_NewSource, metavar="NAME[:CONFIG]", default=argparse.SUPPRESS,
                       help="a task from a Hugging Face dataset (needs: pip install 'minillm[hf]')")
    group.add_argument("--format", action=_SourceOption, choices=tuple(FORMATS), default=argparse.SUPPRESS,
                       help="format of the data before it (default: squad for .json files and for --hf-dataset)")
    group.add_argument("--fields", action=_SourceOption, metavar="ROLE=FIELD,...", default=argparse.SUPPRESS,
                       help="which field fills each role: question, context, answers, id (QA); document, summary, id "
                            "(summarization); dotted paths reach nested fields (answers=answers.text)")
    group.add_argument("--name", action=_SourceOption, default=argparse.SUPPRESS,
                       help="the task's name (default: the file's stem and a hash of its path)")
    group.add_argument("--split", action=_SourceOption, default=argparse.SUPPRESS,
                       help="the --hf-dataset split (default: validation)")
    group.add_argument("--shots", type=count_argument(0),
                       help="N demonstrations drawn from each task's own data, never scored (default: each task's "
                            "own: fixed ones for capitals, fanoutqa, summarization; 2 drawn for reading tasks)")
    group.add_argument("--seed", type=count_argument(0), default=0, help="seed that draws the demonstrations (default: 0)")
    group.add_argument("--template",
                       help="the prompt of one example, with named fields such as {question}, {context}, {document}; "
                            "\\n is a line break; @FILE reads it from a file")
    group.add_argument("--max-new-tokens", type=count_argument(1), help="answer budget in tokens (default: each task's own)")
    group.add_argument("--chat", action="store_true", help="write each prompt in the model's chat template, "
                                                            "demonstrations as earlier turns")
    group.add_argument("--limit", type=count_argument(1), help="N examples of each task, spread evenly over it "
                                                      "(default: all)")


def tasks_from_arguments(args: argparse.Namespace, tokenizer: Tokenizer | None = None) -> list[Task]:
    """The tasks the options ask for, with their prompts: every problem is a one-line ValueError.

    With --chat the prompts need the tokenizer's chat template: pass `tokenizer`, or leave it out and
    the checkpoint's tokenizer (`args.model`) is read, which does not load the model.
    """
    template = _template(args.template) if args.template is not None else None
    tasks = _builtin_tasks(args.task) + [_source_task(source) for source in getattr(args, "sources", [])]
    if not tasks:
        raise ValueError("no task: give --task NAME, --data PATH or --hf-dataset NAME")
    _check_unique_names(tasks)
    if args.chat and tokenizer is None:
        from minillm.checkpoint import resolve_checkpoint
        from minillm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_checkpoint(args.model))
    chat = tokenizer.chat_format() if args.chat else None
    return [with_options(task, template=template, shots=args.shots, seed=args.seed,
                         max_new_tokens=args.max_new_tokens, limit=args.limit, chat=chat) for task in tasks]


def _builtin_tasks(spec: str | None) -> list[Task]:
    if spec is None:
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in TASKS:
            raise ValueError(f"--task: unknown task {name!r}; built-in tasks: {', '.join(TASKS)} "
                             "(for your own file: --data PATH --format FORMAT)")
        if names.count(name) > 1:
            raise ValueError(f"--task names {name!r} twice: each task runs once")
    return [get_task(name) for name in names]


def _source_task(source: dict) -> Task:
    name = source["name"]
    if name is not None and not _NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: use letters, digits and . : - _ [ ] only "
                         "(it is part of every record's key)")
    if source["option"] == "--hf-dataset":
        return load_hf(source["location"], source["format"] or "squad", split=source["split"] or "validation",
                       fields=source["fields"], name=name)
    return load_data(source["location"], source["format"], fields=source["fields"], name=name)


def _check_unique_names(tasks: list[Task]) -> None:
    # A task's name is part of every record's key: two tasks under one name would overwrite each other.
    names = [task.name for task in tasks]
    for task in tasks:
        if names.count(task.name) > 1:
            sources = " and ".join(other.source or other.name for other in tasks if other.name == task.name)
            raise ValueError(f"two tasks are named {task.name!r} ({sources}): give one of them --name")


def _template(text: str) -> str:
    """The --template value: the text itself (\\n and \\t written out as escapes), or @FILE's content."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--template {text}: cannot read {path} ({error})") from None
        return content.removesuffix("\n")  # an editor's final newline is not part of the prompt
    return text.replace("\\n", "\n").replace("\\t", "\t")


# --- `minillm tasks` -------------------------------------------------------------------------

def print_tasks(args: argparse.Namespace | None = None) -> None:
    """The built-in tasks as a table: name, scored examples, demonstrations, metric, chance level."""
    rows = describe_tasks()
    width = max(len(row["task"]) for row in rows)
    print(f"{'task':<{width}}  examples  shots  metric       chance  description")
    for row in rows:
        print(f"{row['task']:<{width}}  {row['examples']:>8}  {row['shots']:>5}  {row['metric']:<11}  "
              f"{row['chance']:>6.3f}  {row['description']}")


def register_task_commands(commands) -> None:
    """Add `minillm tasks` to a command line's subcommands (an `add_subparsers()` result)."""
    tasks = commands.add_parser("tasks", help="list the built-in tasks: examples, metric, chance level",
                                description="The built-in tasks, with their scored examples, demonstrations, "
                                            "metric and chance level. Your own data: --data PATH --format FORMAT "
                                            "in `minillm sweep` (see docs/evals.md).")
    tasks.set_defaults(run=print_tasks)
