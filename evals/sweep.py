"""Sweeps: model x task x manipulation x k (x seed), one JSON line per generated answer.

For every task the sweep generates an answer to each example

- once without manipulation: the baseline, recorded as kind "baseline" at k = L
  (k = L means no layer's view is altered, so it is the same run for every kind
  and is computed once per task), and
- for every manipulation kind, at every requested k below L (and for `random`,
  once per seed; the other kinds are deterministic and run once, seed null).

`swap` is not a sweep kind: it needs a donor state for each prompt, which only
makes sense for a designed pair of prompts. The swap experiment (`evals.swap`)
supplies them for the capitals task.

Run directory
-------------
    results.jsonl                   records of an unsharded run
    results.shard-I-of-N.jsonl      records of shard I of N

Each line is one record (see `make_record`): task, example id, kind, k, seed,
prompt token ids, generation, prediction, scores, the manipulation's `to_dict()`
and the model. Records carry no timestamps, so the same command gives the same
bytes; a record's key is (task, example, kind, k, seed).

How the work is cut up, and why it makes resuming and sharding exact
--------------------------------------------------------------------
A task's prompts are sorted by token length (ties in example order) and cut
into batches of `batch_size`, which keeps padding small. A *work unit* is one
batch under one condition (baseline, or kind at k with a seed): one call of
`generate_tokens`. The list of units is a fixed function of the arguments, and a
unit's batch never depends on what is already done, so its answers are the same
numbers whether it runs first, after a resume, or in another shard. Hence:

- Resume: every result file in the directory is read; units whose records all
  exist are skipped, a unit that was cut short is rerun and only its missing
  records are written (they are its last ones, so the file ends up byte-identical
  to an uninterrupted run's). A partial last line, left by a kill mid-write, is
  cut off before appending.
- `--shard I/N`: shard I takes the units whose index is I-1 modulo N and writes
  its own file; aggregation reads all files of the directory together.
  (Two processes must never run the same shard into the same directory.)

Below layer k every manipulation computes exactly what the baseline computes, so
each batch is run once unmanipulated (`PromptStates`) and every condition of that
batch starts from the stored states at its own layer k.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from evals.tasks import Example, Task
from minillm.generate import PromptStates, generate_tokens
from minillm.manipulation import KIND_FACTS, Manipulation
from minillm.model import Transformer
from minillm.tokenizer import Tokenizer

BASELINE = "baseline"
SWEEP_KINDS = tuple(kind for kind, facts in KIND_FACTS.items() if not facts.donor)
RESULTS_GLOB = "results*.jsonl"


class SweepError(ValueError):
    """Arguments a sweep cannot run with, or a run directory it cannot continue."""


# ----------------------------------------------------------------------------- what to run

@dataclass(frozen=True)
class LayerGrid:
    """The values of k to sweep: START:STOP:STEP with STOP included (STOP left out: up to L).

    The baseline (k = L) is always run, whether or not the grid reaches L.
    """

    start: int = 0
    stop: int | None = None
    step: int = 1

    @classmethod
    def parse(cls, spec: str) -> "LayerGrid":
        """'all' (every k) or 'START:STOP:STEP' such as '0:30:3' or '0::3'."""
        if spec == "all":
            return cls()
        parts = spec.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            start, stop, step = (int(part) if part else None for part in parts)
        except ValueError:
            raise SweepError(f"--layers must be 'all' or START:STOP:STEP (e.g. 0:30:3), got {spec!r}") from None
        start = 0 if start is None else start
        step = 1 if step is None else step
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise SweepError(f"--layers {spec!r}: need 0 <= START <= STOP and STEP >= 1")
        return cls(start, stop, step)

    def values(self, num_layers: int) -> list[int]:
        """The grid's k values for a model of num_layers layers (an error if it reaches past L)."""
        stop = num_layers if self.stop is None else self.stop
        if stop > num_layers:
            raise SweepError(f"--layers reaches k={stop}, but the model has {num_layers} layers (k <= {num_layers})")
        return list(range(self.start, stop + 1, self.step))


def layers_for(kind: str, grid: LayerGrid, num_layers: int) -> list[int]:
    """The k values at which `kind` runs: the grid's values below L (k = L is the shared baseline).

    freeze keeps H[k-1], so its lowest valid k is 1: a grid value of 0 becomes 1 for freeze.
    """
    lowest = KIND_FACTS[kind].lowest_layer
    return sorted({max(k, lowest) for k in grid.values(num_layers) if k < num_layers})


@dataclass(frozen=True)
class Condition:
    """How a batch is run: the baseline, or one manipulation at layer k (with a seed for random)."""

    kind: str
    k: int
    seed: int | None = None

    def key(self, task: str, example: str) -> tuple:
        """The key of the record for one example under this condition (see `record_key`)."""
        return task, example, self.kind, self.k, self.seed

    def manipulation(self) -> Manipulation | None:
        if self.kind == BASELINE:
            return None
        return Manipulation(self.kind, self.k, seed=self.seed or 0)


def check_kinds(kinds: Sequence[str]) -> None:
    for kind in kinds:
        if kind in KIND_FACTS and KIND_FACTS[kind].donor:
            raise SweepError("swap is not a sweep kind: it needs a donor state per prompt; "
                             "run the swap experiment instead (minillm swap)")
        if kind not in SWEEP_KINDS:
            raise SweepError(f"unknown manipulation {kind!r}; sweep kinds: {', '.join(SWEEP_KINDS)}")


def conditions(kinds: Sequence[str], grid: LayerGrid, seeds: int, num_layers: int) -> list[Condition]:
    """The baseline first, then every kind at each of its k (and each seed for random)."""
    check_kinds(kinds)
    if seeds < 1:
        raise SweepError(f"--seeds must be at least 1, got {seeds}")
    runs = [Condition(BASELINE, num_layers)]
    for kind in kinds:
        kind_seeds = range(seeds) if KIND_FACTS[kind].seeded else [None]
        runs += [Condition(kind, k, seed) for k in layers_for(kind, grid, num_layers) for seed in kind_seeds]
    return runs


def evenly_spaced(task: Task, count: int | None) -> Task:
    """The task with `count` of its examples, spread evenly over it (all of them for None).

    Neighbouring examples often share a source (fanoutqa lists the sub-questions of one question
    together), so a spread sample is more representative than the first `count`.
    """
    if count is None or count >= len(task.examples):
        return task
    if count < 1:
        raise SweepError(f"--limit must be at least 1, got {count}")
    step = len(task.examples) / count
    return dataclasses.replace(task, examples=tuple(task.examples[int(i * step)] for i in range(count)))


@dataclass(frozen=True)
class Batch:
    """Examples of one task that are generated together, with their prompt token ids."""

    task: Task
    examples: tuple[Example, ...]
    prompts: tuple[tuple[int, ...], ...]


def length_sorted_batches(task: Task, examples: Sequence[Example], tokenizer: Tokenizer,
                          batch_size: int) -> list[Batch]:
    """Batches of `batch_size` examples in order of prompt length (ties: given order), so little padding."""
    if batch_size < 1:
        raise SweepError(f"--batch-size must be at least 1, got {batch_size}")
    prompts = [tuple(tokenizer.encode(task.prompt(example))) for example in examples]
    order = sorted(range(len(prompts)), key=lambda index: (len(prompts[index]), index))
    return [Batch(task, tuple(examples[i] for i in chunk), tuple(prompts[i] for i in chunk))
            for chunk in (order[start:start + batch_size] for start in range(0, len(order), batch_size))]


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`: the work units whose position is index-1 modulo count."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        try:
            index, count = (int(part) for part in spec.split("/"))
        except ValueError:
            raise SweepError(f"--shard must be I/N with whole numbers (e.g. 2/4), got {spec!r}") from None
        if not 1 <= index <= count:
            raise SweepError(f"--shard {spec!r}: need 1 <= I <= N")
        return cls(index, count)

    @property
    def filename(self) -> str:
        return "results.jsonl" if self.count == 1 else f"results.shard-{self.index}-of-{self.count}.jsonl"

    def owns(self, unit_index: int) -> bool:
        return unit_index % self.count == self.index - 1


# ----------------------------------------------------------------------------- result files

def record_key(record: dict) -> tuple:
    """What identifies a record: (task, example id, kind, k, seed)."""
    return record["task"], record["example"], record["kind"], record["k"], record["seed"]


def complete_lines(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and the byte length of its complete lines.

    A last line without its newline is a write that was cut short (or, in another shard's file,
    one still being written): it is not a record.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise SweepError(f"{path}:{number}: not a JSON record ({error.msg}); "
                             "fix or remove the line to continue") from None
    return records, end


def read_records(paths: Iterable[Path]) -> dict[tuple, dict]:
    """All records of these files by key; a key found twice keeps its first record."""
    records: dict[tuple, dict] = {}
    for path in sorted(paths):
        for record in complete_lines(path)[0]:
            records.setdefault(record_key(record), record)
    return records


class ResultLog:
    """One process's result file, appended to, and the records the whole directory already holds.

    The file is created at the first record, so a run refused before any work leaves no file behind.
    """

    def __init__(self, path: Path, siblings_glob: str):
        if path.exists():
            _, end = complete_lines(path)
            with open(path, "r+b") as existing:  # drop a partial last line left by a kill mid-write
                existing.truncate(end)
        self.done = read_records(path.parent.glob(siblings_glob))
        self.path = path
        self._file = None

    def check_same_run(self, **expected) -> None:
        """Refuse to mix records of another model (or dtype, depth) into this directory."""
        for record in self.done.values():
            for field, value in expected.items():
                if record[field] != value:
                    raise SweepError(f"{self.path.parent} holds results for {field} {record[field]!r}, this run "
                                     f"has {value!r}: use another output directory")

    def write(self, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.done[record_key(record)] = record

    def flush(self) -> None:
        """Push what was written to disk: what a kill leaves is then at most one partial line."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ----------------------------------------------------------------------------- generating and scoring

def reached_stop(text: str, stop: Sequence[str]) -> bool:
    """Whether the answer in `text` has ended (the test `Task.postprocess` cuts by: leading space aside)."""
    answer = text.lstrip()
    return any(s and s in answer for s in stop)


def generate_answers(model: Transformer, tokenizer: Tokenizer, batch: Batch, manipulation: Manipulation | None,
                     prompt_states: PromptStates) -> list[str]:
    """Greedy generations (decoded, stop token dropped) for a batch, starting from its shared prompt states.

    efficient=True lets freeze and skip_attention skip the work whose result nobody reads (the same
    tokens, less compute): see `generate_tokens`.
    """
    task = batch.task
    result = generate_tokens(
        model, batch.prompts, task.max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
        manipulation=manipulation, stop=lambda new_tokens: reached_stop(tokenizer.decode(new_tokens), task.stop),
        prompt_states=prompt_states, efficient=True)
    return [tokenizer.decode(tokens) for tokens in result.tokens]


def batch_prompt_states(model: Transformer, tokenizer: Tokenizer, batch: Batch) -> PromptStates:
    return PromptStates.compute(model, batch.prompts, batch.task.max_new_tokens, pad_id=tokenizer.pad_id)


def dtype_name(model: Transformer) -> str:
    return str(model.embed_tokens.weight.dtype).removeprefix("torch.")


def make_record(batch: Batch, index: int, condition: Condition, manipulation: Manipulation | None,
                generation: str, model: Transformer, model_name: str) -> dict:
    """The JSON record of one answer: what was asked, what came back, how it scored, under what."""
    task, example = batch.task, batch.examples[index]
    return {
        "task": task.name,
        "example": example.id,
        "kind": condition.kind,
        "k": condition.k,
        "seed": condition.seed,
        "num_layers": model.config.num_layers,
        "model": model_name,
        "dtype": dtype_name(model),
        "metric": task.primary,
        "chance": task.chance,
        "prompt_ids": list(batch.prompts[index]),
        "generation": generation,
        "prediction": task.postprocess(generation),
        "golds": list(example.golds),
        "scores": task.score(generation, example),
        "manipulation": None if manipulation is None else manipulation.to_dict(),
    }


# ----------------------------------------------------------------------------- the sweep

def plan(model: Transformer, tokenizer: Tokenizer, tasks: Sequence[Task], kinds: Sequence[str], grid: LayerGrid,
         seeds: int, batch_size: int) -> list[tuple[Batch, Condition]]:
    """Every work unit of the sweep, in a fixed order: task by task, batch by batch, condition by condition."""
    runs = conditions(kinds, grid, seeds, model.config.num_layers)
    units = []
    for task in tasks:
        for batch in length_sorted_batches(task, task.examples, tokenizer, batch_size):
            units += [(batch, condition) for condition in runs]
    return units


def work(batch: Batch, indices: Iterable[int]) -> int:
    """Tokens that generating these examples of the batch may process: a rough measure of its cost."""
    return sum(len(batch.prompts[index]) + batch.task.max_new_tokens for index in indices)


def missing(log: ResultLog, batch: Batch, condition: Condition) -> list[int]:
    """Indices of the batch's examples that have no record under this condition yet."""
    return [index for index, example in enumerate(batch.examples)
            if condition.key(batch.task.name, example.id) not in log.done]


def run_sweep(model: Transformer, tokenizer: Tokenizer, tasks: Sequence[Task], kinds: Sequence[str],
              grid: LayerGrid, out_dir: str | os.PathLike, *, model_name: str, seeds: int = 1,
              batch_size: int = 8, shard: Shard = Shard(), progress: bool = True) -> Path:
    """Run (or continue) this shard's part of the sweep into out_dir; returns its result file."""
    units = [unit for index, unit in enumerate(plan(model, tokenizer, tasks, kinds, grid, seeds, batch_size))
             if shard.owns(index)]
    log = ResultLog(Path(out_dir) / shard.filename, RESULTS_GLOB)
    log.check_same_run(model=model_name, dtype=dtype_name(model), num_layers=model.config.num_layers)
    todo = [(batch, condition, missing(log, batch, condition)) for batch, condition in units]
    # Progress in tokens (prompt + answer budget), a fair measure of cost across tasks, so the ETA holds.
    total = sum(work(batch, range(len(batch.examples))) for batch, _ in units)
    remaining = sum(work(batch, indices) for batch, _, indices in todo)
    prompt_states, states_batch = None, None
    try:
        with tqdm(total=total, initial=total - remaining, unit="tok", unit_scale=True, desc="sweep",
                  file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            for batch, condition, indices in todo:
                if not indices:
                    continue
                if states_batch is not batch:  # units come batch by batch: one unmanipulated pass per batch
                    prompt_states, states_batch = batch_prompt_states(model, tokenizer, batch), batch
                bar.set_description(f"{batch.task.name} {condition.kind} k={condition.k}")
                manipulation = condition.manipulation()
                generations = generate_answers(model, tokenizer, batch, manipulation, prompt_states)
                for index in indices:
                    log.write(make_record(batch, index, condition, manipulation, generations[index], model,
                                          model_name))
                log.flush()
                bar.update(work(batch, indices))
    finally:
        log.close()
    return log.path


# ----------------------------------------------------------------------------- aggregation

@dataclass(frozen=True)
class Point:
    k: int
    score: float  # mean primary score over examples (and seeds)
    count: int  # records averaged


@dataclass(frozen=True)
class TaskSummary:
    """One task's curves: mean primary score per kind and k, with the baseline and the chance level."""

    task: str
    metric: str
    chance: float
    num_layers: int
    baseline: Point
    curves: dict[str, list[Point]]  # kind -> points by k, ending with the baseline at k = L

    def to_dict(self) -> dict:
        as_dict = lambda point: {"k": point.k, "score": point.score, "count": point.count}  # noqa: E731
        return {"task": self.task, "metric": self.metric, "chance": self.chance, "num_layers": self.num_layers,
                "baseline": as_dict(self.baseline),
                "curves": {kind: [as_dict(point) for point in points] for kind, points in self.curves.items()}}


def aggregate(records: Iterable[dict]) -> dict[str, TaskSummary]:
    """Per task, the mean primary score for each (kind, k); tasks without a baseline are left out."""
    scores: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    about: dict[str, dict] = {}
    for record in records:
        scores[record["task"], record["kind"], record["k"]].append(record["scores"][record["metric"]])
        about.setdefault(record["task"], record)
    means = {key: Point(key[2], sum(values) / len(values), len(values)) for key, values in scores.items()}

    summaries = {}
    for task, record in about.items():
        L = record["num_layers"]
        baseline = means.get((task, BASELINE, L))
        if baseline is None:
            continue
        curves = defaultdict(list)
        for (curve_task, kind, _), point in sorted(means.items(), key=lambda item: (item[0][1], item[0][2])):
            if curve_task == task and kind != BASELINE:
                curves[kind].append(point)
        summaries[task] = TaskSummary(task, record["metric"], record["chance"], L, baseline,
                                      {kind: points + [baseline] for kind, points in curves.items()})
    return summaries


def load_results(out_dir: str | os.PathLike) -> dict[tuple, dict]:
    """Every sweep record of a run directory (all shards), by key."""
    paths = list(Path(out_dir).glob(RESULTS_GLOB))
    if not paths:
        raise SweepError(f"{out_dir}: no sweep results (no {RESULTS_GLOB} files)")
    return read_records(paths)
