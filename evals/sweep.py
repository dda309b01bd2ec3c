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

The result folder (record files, run manifest, lock) is `evals.results`; turning
records into curves with intervals is `evals.aggregate`. Without a folder a sweep
runs in memory and only returns its records and summaries.

`--limit N` means, everywhere in the harness: N examples spread evenly over the
task (every len/N-th, from the first; see `evenly_spaced`).

How the work is cut up, and why it makes resuming and sharding exact
--------------------------------------------------------------------
A task's prompts are sorted by token length (ties in example order) and cut
into batches of `batch_size`, which keeps padding small. A *work unit* is one
batch under one or more conditions (baseline, or kind at k with a seed) of one
kind, consecutive in the sweep's order, as many as keep their KV caches within
`pack_tokens` token slots (rows x positions; `--pack-tokens`): each condition's
first pass runs on its own, and their decode steps run packed in one batch
(`minillm.generate.generate_packed`), which costs little more per step than one
condition's. The list of units is a fixed function of the
arguments, and a unit's batch and conditions never depend on what is already
done, so its answers are the same numbers whether it runs first, after a
resume, or in another shard. Hence:

- Resume: every result file in the directory is read; units whose records all
  exist are skipped, a unit that was cut short is rerun and only its missing
  records are written (they are its last ones, so the file ends up byte-identical
  to an uninterrupted run's). A partial last line, left by a kill mid-write, is
  cut off before appending.
- `--shard I/N` (I counts from 1): shard I takes the units whose index is I-1
  modulo N and writes its own file; aggregation reads all files of the folder
  together. `--shard auto` takes I and N from torchrun or a Slurm job array (see
  `Shard.from_environment` and docs/cluster.md). A second process writing the same
  shard file is refused (see `evals.results.claimed_folder`).

Below layer k every manipulation computes exactly what the baseline computes, so
each batch is run once unmanipulated (`PromptStates`) and every condition of that
batch starts from the stored states at its own layer k.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from evals.aggregate import BASELINE, TaskSummary, aggregate
from evals.results import (
    RESULTS_GLOB,
    ResultLog,
    SweepError,
    check_records_match,
    claim_manifest,
    claimed_folder,
    dtype_name,
    model_manifest,
    sha256_json,
)
from evals.tasks import Example, Task
from minillm.generate import PromptStates, generate_packed, generate_tokens
from minillm.inputs import check_fits_context
from minillm.manipulation import KIND_FACTS, Manipulation
from minillm.model import Transformer
from minillm.packed import PACK_TOKENS, in_packs
from minillm.tokenizer import Tokenizer

SWEEP_KINDS = tuple(kind for kind, facts in KIND_FACTS.items() if not facts.donor)


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
    def parse(cls, spec: str) -> LayerGrid:
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
        for end in (self.start, stop):
            if end > num_layers:
                raise SweepError(f"--layers reaches k={end}, but the model has {num_layers} layers "
                                 f"(k <= {num_layers})")
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
        """The key of the record for one example under this condition (see `evals.results.record_key`)."""
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


@dataclass(frozen=True)
class Batch:
    """Examples of one task that are generated together, with their prompts (text and token ids)."""

    task: Task
    examples: tuple[Example, ...]
    texts: tuple[str, ...]
    prompts: tuple[tuple[int, ...], ...]


def length_sorted_batches(task: Task, examples: Sequence[Example], tokenizer: Tokenizer,
                          batch_size: int) -> list[Batch]:
    """Batches of `batch_size` examples in order of prompt length (ties: given order), so little padding."""
    if batch_size < 1:
        raise SweepError(f"--batch-size must be at least 1, got {batch_size}")
    texts = [task.prompt(example) for example in examples]
    prompts = [tuple(tokenizer.encode(text)) for text in texts]
    order = sorted(range(len(prompts)), key=lambda index: (len(prompts[index]), index))
    return [Batch(task, tuple(examples[i] for i in chunk), tuple(texts[i] for i in chunk),
                  tuple(prompts[i] for i in chunk))
            for chunk in (order[start:start + batch_size] for start in range(0, len(order), batch_size))]


def auto_batch_size(model: Transformer, tokenizer: Tokenizer, tasks: Sequence[Task]) -> int:
    """`--batch-size auto`: the largest batch whose longest prompt plus answer budget, with its shared prompt
    states, fits the memory budget of the model's device (see `minillm.memory`)."""
    from minillm import memory

    longest, new_tokens = longest_sequence(tokenizer, tasks)
    weight = model.embed_tokens.weight
    return memory.auto_batch_size(model.config, weight.dtype, longest, new_tokens, memory.memory_budget(weight.device))


def longest_sequence(tokenizer: Tokenizer, tasks: Sequence[Task]) -> tuple[int, int]:
    """The longest prompt of these tasks in tokens, and the largest answer budget (max_new_tokens)."""
    longest = max(len(tokenizer.encode(task.prompt(example))) for task in tasks for example in task.examples)
    return longest, max(task.max_new_tokens for task in tasks)


def task_manifest(task: Task, tokenizer: Tokenizer) -> dict:
    """What must not change between the runs that fill one folder with a task's records."""
    return {"examples": len(task.examples),
            "examples_sha256": sha256_json([[e.id, e.fields, list(e.golds)] for e in task.examples]),
            "prompts_sha256": sha256_json([tokenizer.encode(task.prompt(example)) for example in task.examples]),
            "template": task.template, "shots": [shot.id for shot in task.shots],
            "max_new_tokens": task.max_new_tokens, "metric": task.primary, "stop": list(task.stop)}


def unique_names(tasks: Sequence[Task]) -> None:
    """Refuse two tasks of one name: their records would share keys, and one would pass for the other."""
    seen = set()
    for task in tasks:
        if task.name in seen:
            raise SweepError(f"two tasks are named {task.name!r}: give them distinct names (records are keyed "
                             "by task name)")
        seen.add(task.name)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, counted from 1 (1/4 ... 4/4): the work units whose position is index-1 modulo count."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, spec: str, environment: Mapping[str, str] = os.environ) -> Shard:
        """'I/N' with 1 <= I <= N, or 'auto' (from torchrun or a Slurm job array: `from_environment`)."""
        if spec == "auto":
            return cls.from_environment(environment)
        try:
            index, count = (int(part) for part in spec.split("/"))
        except ValueError:
            raise SweepError(f"--shard must be I/N with whole numbers, I counted from 1 (e.g. 2/4), or auto; "
                             f"got {spec!r}") from None
        if count < 1 or not 1 <= index <= count:
            hint = f" (shards count from 1: 1/{count} ... {count}/{count})" if index == 0 and count >= 1 else ""
            raise SweepError(f"--shard {spec!r}: need 1 <= I <= N{hint}")
        return cls(index, count)

    @classmethod
    def from_environment(cls, environment: Mapping[str, str]) -> Shard:
        """The shard of this process under torchrun (RANK, WORLD_SIZE) or a Slurm job array.

        Slurm numbers array tasks from SLURM_ARRAY_TASK_MIN (often 0, sometimes 1) in steps of
        SLURM_ARRAY_TASK_STEP; torchrun numbers ranks from 0. Both become I = position + 1.
        """
        if "WORLD_SIZE" in environment and "RANK" in environment:
            rank, size = int(environment["RANK"]), int(environment["WORLD_SIZE"])
            return cls(rank + 1, size)
        if "SLURM_ARRAY_TASK_ID" in environment and "SLURM_ARRAY_TASK_COUNT" in environment:
            first = int(environment.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(environment.get("SLURM_ARRAY_TASK_STEP", "1"))
            position = (int(environment["SLURM_ARRAY_TASK_ID"]) - first) // step
            return cls(position + 1, int(environment["SLURM_ARRAY_TASK_COUNT"]))
        raise SweepError("--shard auto: found neither torchrun's RANK/WORLD_SIZE nor a Slurm array's "
                         "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT in the environment; give --shard I/N "
                         "(I counted from 1)")

    @property
    def filename(self) -> str:
        return "results.jsonl" if self.count == 1 else f"results.shard-{self.index}-of-{self.count}.jsonl"

    def owns(self, unit_index: int) -> bool:
        return unit_index % self.count == self.index - 1


# ----------------------------------------------------------------------------- generating and scoring

def reached_stop(text: str, stop: Sequence[str]) -> bool:
    """Whether the answer in `text` has ended (the test `Task.postprocess` cuts by: leading space aside)."""
    answer = text.lstrip()
    return any(s and s in answer for s in stop)


def generate_answers(model: Transformer, tokenizer: Tokenizer, batch: Batch,
                     manipulations: Sequence[Manipulation | None], prompt_states: PromptStates) -> list[list[str]]:
    """Greedy generations (decoded, stop token dropped) for a batch under each manipulation, starting from its
    shared prompt states; several manipulations decode packed in one batch.

    efficient=True lets freeze and skip_attention skip the work whose result nobody reads (the same
    tokens, less compute): see `generate_tokens`.
    """
    task = batch.task
    options = dict(eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, prompt_states=prompt_states, efficient=True,
                   stop=lambda new_tokens: reached_stop(tokenizer.decode(new_tokens), task.stop))
    if len(manipulations) == 1:
        results = [generate_tokens(model, batch.prompts, task.max_new_tokens, manipulation=manipulations[0], **options)]
    else:
        results = generate_packed(model, batch.prompts, task.max_new_tokens, manipulations, **options)
    return [[tokenizer.decode(tokens) for tokens in result.tokens] for result in results]


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
        "prompt": batch.texts[index],
        "prompt_ids": list(batch.prompts[index]),
        "generation": generation,
        "prediction": task.postprocess(generation),
        "golds": list(example.golds),
        "scores": task.score(generation, example),
        "manipulation": None if manipulation is None else manipulation.to_dict(),
    }


def batch_prompt_states(model: Transformer, tokenizer: Tokenizer, batch: Batch) -> PromptStates:
    return PromptStates.compute(model, batch.prompts, batch.task.max_new_tokens, pad_id=tokenizer.pad_id)


# ----------------------------------------------------------------------------- the sweep

Unit = tuple[Batch, tuple[Condition, ...]]  # a batch under conditions of one kind, decoded together


def packed_units(batch: Batch, runs: Sequence[Condition], pack_tokens: int) -> list[Unit]:
    """The batch under each condition in order: consecutive conditions of one kind together in one unit, as many
    as keep their caches within pack_tokens token slots (`minillm.packed.in_packs`)."""
    packs = in_packs(runs, lambda condition: condition.kind, batch.prompts, batch.task.max_new_tokens, pack_tokens)
    return [(batch, tuple(pack)) for pack in packs]


def plan(model: Transformer, tokenizer: Tokenizer, tasks: Sequence[Task], kinds: Sequence[str], grid: LayerGrid,
         seeds: int, batch_size: int, pack_tokens: int) -> tuple[list[Unit], dict]:
    """Every work unit of the sweep, in a fixed order (task by task, batch by batch, condition by condition),
    and the sweep's settings for the run manifest."""
    unique_names(tasks)
    runs = conditions(kinds, grid, seeds, model.config.num_layers)
    units, manifests = [], {}
    for task in tasks:
        batches = length_sorted_batches(task, task.examples, tokenizer, batch_size)
        for batch in batches:  # refused here, by name, rather than half-way through the sweep as prompts[i]
            for example, prompt in zip(batch.examples, batch.prompts, strict=True):
                check_fits_context(len(prompt), task.max_new_tokens, model.config,
                                   f"task {task.name!r}, example {example.id!r}: its prompt")
        units += [unit for batch in batches for unit in packed_units(batch, runs, pack_tokens)]
        manifests[task.name] = task_manifest(task, tokenizer)
    settings = {"batch_size": batch_size, "pack_tokens": pack_tokens, "tasks": manifests, "kinds": sorted(set(kinds)),
                "layers": sorted({condition.k for condition in runs[1:]}), "seeds": seeds}
    return units, settings


def work(batch: Batch, indices: Iterable[int]) -> int:
    """Tokens that generating these examples of the batch may process: a rough measure of its cost."""
    return sum(len(batch.prompts[index]) + batch.task.max_new_tokens for index in indices)


def missing(log: ResultLog, batch: Batch, condition: Condition) -> list[int]:
    """Indices of the batch's examples that have no record under this condition yet."""
    return [index for index, example in enumerate(batch.examples)
            if condition.key(batch.task.name, example.id) not in log.done]


@dataclass
class SweepResult:
    """What a sweep returns: its records (this shard's), the curves they give, and its file when written."""

    records: list[dict]
    summaries: dict[str, TaskSummary]
    path: Path | None = None


def run_sweep(model: Transformer, tokenizer: Tokenizer, tasks: Sequence[Task], kinds: Sequence[str],
              grid: LayerGrid, out_dir: str | os.PathLike | None = None, *, seeds: int = 1, batch_size: int = 16,
              pack_tokens: int = PACK_TOKENS, shard: Shard | None = None, model_name: str = "model",
              progress: bool = True) -> SweepResult:
    """Run this shard's part of the sweep, in memory, or into out_dir (continuing what it holds).

    pack_tokens: how many conditions of one kind decode together, as the token slots (rows x positions) of
    their KV caches in all (see the module's docstring and `minillm.packed.PACK_TOKENS`); 1: each alone.
    With out_dir, the folder's run manifest must agree with this run (see `evals.results`), and
    the records go to the shard's file as they come.
    """
    shard = shard or Shard()
    if pack_tokens < 1:
        raise SweepError(f"--pack-tokens must be at least 1, got {pack_tokens}")
    planned, settings = plan(model, tokenizer, tasks, kinds, grid, seeds, batch_size, pack_tokens)
    units = [unit for index, unit in enumerate(planned) if shard.owns(index)]
    if out_dir is None:
        return execute(model, tokenizer, units, ResultLog(None, RESULTS_GLOB), model_name, progress)
    with claimed_folder(out_dir, shard.filename) as folder:
        claim_manifest(folder, model_manifest(model, model_name), "sweep", settings)
        log = ResultLog(folder / shard.filename, RESULTS_GLOB)
        check_records_match(log.done, [(condition.key(batch.task.name, example.id), list(prompt), list(example.golds))
                                       for batch, runs in units for condition in runs
                                       for example, prompt in zip(batch.examples, batch.prompts)], folder)
        return execute(model, tokenizer, units, log, model_name, progress)


def execute(model: Transformer, tokenizer: Tokenizer, units: Sequence[Unit], log: ResultLog, model_name: str,
            progress: bool) -> SweepResult:
    """Generate the records of every unit that the log does not hold yet; return all the units' records."""
    todo = [(batch, runs, [missing(log, batch, condition) for condition in runs]) for batch, runs in units]
    # Progress in tokens (prompt + answer budget), a fair measure of cost across tasks, so the ETA holds.
    total = sum(len(runs) * work(batch, range(len(batch.examples))) for batch, runs in units)
    remaining = sum(work(batch, indices) for batch, _, missings in todo for indices in missings)
    prompt_states, states_batch = None, None
    try:
        with tqdm(total=total, initial=total - remaining, unit="tok", unit_scale=True, desc="sweep",
                  file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            for batch, runs, missings in todo:
                if not any(missings):
                    continue
                if states_batch is not batch:  # units come batch by batch: one unmanipulated pass per batch
                    prompt_states = None  # free the previous batch's states (H and cache) before the next pass
                    prompt_states, states_batch = batch_prompt_states(model, tokenizer, batch), batch
                layers = ",".join(str(condition.k) for condition in runs)
                bar.set_description(f"{batch.task.name} {runs[0].kind} k={layers}")
                manipulations = [condition.manipulation() for condition in runs]
                answers = generate_answers(model, tokenizer, batch, manipulations, prompt_states)
                for condition, manipulation, generations, indices in zip(runs, manipulations, answers, missings,
                                                                          strict=True):
                    for index in indices:
                        log.write(make_record(batch, index, condition, manipulation, generations[index], model,
                                              model_name))
                log.flush()
                bar.update(sum(work(batch, indices) for indices in missings))
    finally:
        log.close()
    records = [log.done[condition.key(batch.task.name, example.id)] for batch, runs in units for condition in runs
               for example in batch.examples]
    return SweepResult(records, aggregate(records), log.path)
