"""The harness from Python: tasks from your data, a sweep that returns its results, a plot.

    import minillm
    from evals import plot, sweep, task_from_pairs

    model, tokenizer = minillm.load("smollm2-135m")
    task = task_from_pairs([("What is the capital of France?", "Paris"), ...], name="mine", shots=1)
    result = sweep(model, tokenizer, [task], kinds=["freeze", "random"], layers="0::3")
    plot(result, "curves.png")

`docs/evals.md` explains each function, the data formats and the matching command-line options.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from evals.loaders import USER_DATA_LICENCE, load_data
from evals.sweep import LayerGrid, run_sweep
from evals.tasks import FACTOID_TEMPLATE, Example, Task, with_options
from minillm.model import Transformer
from minillm.tokenizer import Tokenizer


def task_from_pairs(pairs: Iterable, answers: Sequence | None = None, *, name: str = "pairs",
                    template: str = FACTOID_TEMPLATE, shots: int = 0, seed: int = 0, metric: str = "squad",
                    primary: str = "exact_match", max_new_tokens: int = 16, stop: Sequence[str] = ("\n",),
                    limit: int | None = None) -> Task:
    """A QA task from (question, answers) pairs, or from a list of questions and a list of answers.

    Each answer is a string or a list of accepted strings. The template's one field is {question}:
    the default writes "Q: {question}\\nA:"; `template="{question}"` uses each first item as the whole
    prompt. `shots` demonstrations are drawn from the pairs with `seed` and not scored. Scored by
    SQuAD exact match (`primary="f1"` for token F1); generation stops at a line break.
    """
    if answers is not None:
        pairs, answers = list(pairs), list(answers)
        if len(pairs) != len(answers):
            raise ValueError(f"{len(pairs)} questions but {len(answers)} answers")
        pairs = zip(pairs, answers, strict=True)
    examples = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pair {index}: expected (question, answers), got {pair!r}")
        question, accepted = pair
        accepted = [accepted] if isinstance(accepted, str) else list(accepted)
        golds = tuple(dict.fromkeys(str(answer).strip() for answer in accepted if str(answer).strip()))
        examples.append(Example(f"{name}-{index}", {"question": str(question)}, golds))
    task = Task(name=name, description=f"{len(examples)} question-answer pairs given in Python", template=template,
                examples=tuple(examples), metric=metric, primary=primary, max_new_tokens=max_new_tokens,
                stop=tuple(stop), source="pairs given in Python", licence=USER_DATA_LICENCE)
    return with_options(task, shots=shots, seed=seed, limit=limit)


def task_from_file(path: str | os.PathLike, format: str | None = None, *, fields: str | dict | None = None,
                   name: str | None = None, template: str | None = None, shots: int | None = None, seed: int = 0,
                   max_new_tokens: int | None = None, limit: int | None = None) -> Task:
    """A task from a SQuAD JSON or JSON-lines file, as `--data PATH` builds it (see `evals.loaders`).

    `format`: squad (the default for .json), qa-jsonl or summarization-jsonl; `fields` maps roles to
    fields ("question=q,answers=gold.text" or a dict). The other options are those of the command line.
    """
    task = load_data(path, format, fields=fields, name=name)
    return with_options(task, template=template, shots=shots, seed=seed, max_new_tokens=max_new_tokens, limit=limit)


def sweep(model: Transformer, tokenizer: Tokenizer, tasks: Task | Iterable[Task],
          kinds: Sequence[str] = ("random", "freeze", "skip_attention"), layers: str | LayerGrid = "all", *,
          out_dir: str | os.PathLike | None = None, seeds: int = 1, batch_size: int = 16,
          model_name: str | None = None, **options):
    """Every task under every manipulation kind at every k of `layers`, and the baseline.

    `layers`: "all", or "START:STOP:STEP" with STOP included ("0::3": every third layer from 0).
    Returns the sweep's result in memory: its records and, per task, kind and k, the score with its
    n and 95% interval. Nothing is written unless `out_dir` is given; then the run is also saved
    there (and continued, if that folder holds the same run). `model_name` (default: the checkpoint
    folder's name) goes into every record. Other keyword arguments go to `evals.sweep.run_sweep`.
    """
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    grid = layers if isinstance(layers, LayerGrid) else LayerGrid.parse(layers)
    model_name = model_name or Path(tokenizer.source).name
    return run_sweep(model, tokenizer, tasks, list(kinds), grid, out_dir, seeds=seeds, batch_size=batch_size,
                     model_name=model_name, **options)


def plot(result, path: str | os.PathLike) -> list[Path]:
    """The score-vs-k figure of a sweep result (or of its per-task summaries) as PNG, its numbers as CSV."""
    from evals.plots import plot_curves  # matplotlib loads only when a figure is drawn

    summaries = getattr(result, "summaries", result)
    return plot_curves(summaries, Path(path))
