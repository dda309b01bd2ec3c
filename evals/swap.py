"""The swap experiment: give "France" the hidden state of "Italy" at layer k; which capital comes out?

The paper's example: in the one-shot prompt

    Q: What is the capital of Spain? A: Madrid
    Q: What is the capital of France? A:

the hidden state of " France" at the input of layer k is replaced by the state of " Italy" at the
same layer k, taken from the donor prompt "The country Italy" (its last token). Swapped low, the
model answers "Rome" (it follows the injected token); swapped in the top third, it answers "Paris"
(by then the question has already been read from the original token, so the swap is ignored).

Here this runs over many country pairs. Per k it reports the rate of the original answer (the
recipient's capital) and of the injected answer (the donor's capital), aliases accepted, with the
lenient `accuracy` metric ("Rome, Italy" counts as Rome).

Choices, and why:

- Prompt: the capitals task's (`evals.tasks.capitals`: the paper's Q/A form, with three
  demonstrations because SmolLM2-135M answers few questions after one).
- Which pairs: only countries whose name is a single token in the prompt and in the donor
  prompt, so one state is swapped for one state and nothing of the original name is left
  behind (a multi-token name would keep its other tokens, a half-swap). And only countries whose
  capital the model gives at baseline, for both sides of a pair: the original rate starts at 1,
  and the injected answer is one the model knows. Each eligible country is a recipient once and a
  donor once (a seeded shuffle, each country's donor the next one in it), skipping a donor that
  shares an accepted answer with its recipient. `evals.tasks.swap_pairs` draws donors among all
  countries instead, most of which a small model does not know.
- Where the name is: the token span where the prompts of different countries differ (common
  prefix and suffix of all prompts' token ids removed), which works for any tokenizer.

Records go to `swap.jsonl` in the run folder (the record format, manifest and resume rules of `evals.results`):
first one baseline record per candidate country (kind "baseline", k = L, scores {"accuracy"}), then
one record per pair and k (kind "swap", with the donor, scores {"original", "injected"}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from evals.aggregate import BASELINE
from evals.metrics import accuracy, normalize_answer
from evals.results import (
    MANIFEST_FILE,
    ResultLog,
    SweepError,
    check_records_match,
    claim_manifest,
    claimed_folder,
    model_manifest,
    read_records,
)
from evals.stats import wilson
from evals.sweep import (
    Batch,
    Condition,
    LayerGrid,
    batch_prompt_states,
    generate_answers,
    length_sorted_batches,
    make_record,
    missing,
    task_manifest,
)
from evals.tasks import Example, Task, capitals, evenly_spaced
from minillm.generate import left_pad
from minillm.manipulation import Manipulation
from minillm.model import Transformer
from minillm.tokenizer import Tokenizer

SWAP_FILE = "swap.jsonl"
TASK_NAME = "capitals-swap"
DONOR_TEMPLATE = "The country {country}"


def swap_task(limit: int | None = None) -> Task:
    """The capitals task (`limit` countries spread evenly over it), scored leniently: does the answer name the
    capital?"""
    task = dataclasses.replace(capitals(), name=TASK_NAME, metric="accuracy", primary="accuracy")
    return evenly_spaced(task, limit)


def single_token_names(tokenizer: Tokenizer, task: Task) -> tuple[int, set[str]]:
    """The position of the country's token, and the ids of the examples whose country is one token there.

    The position is found without tokenizer offsets: the prompts of different countries share
    their opening and closing tokens, and what lies between is the country's name. The name must
    also be the last token of its donor prompt, as the same token.
    """
    prompts = {example.id: tokenizer.encode(task.prompt(example)) for example in task.examples}
    if len(prompts) < 2:
        raise SweepError("the swap experiment needs at least two countries")
    first, *others = prompts.values()
    prefix = min(common_prefix(first, other) for other in others)
    suffix = min(common_prefix(first[::-1], other[::-1]) for other in others)
    single = set()
    for example in task.examples:
        ids = prompts[example.id]
        donor = tokenizer.encode(DONOR_TEMPLATE.format(country=example.fields["country"]))
        if len(ids) - prefix - suffix == 1 and donor[-1] == ids[prefix]:
            single.add(example.id)
    return prefix, single


def common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


def pair_up(countries: list[Example], seed: int) -> list[tuple[Example, Example]]:
    """(recipient, donor) pairs: a seeded shuffle, each country's donor the next one in it."""
    order = sorted(countries, key=lambda example: example.id)
    random.Random(seed).shuffle(order)
    pairs = []
    for index, recipient in enumerate(order):
        donor = order[(index + 1) % len(order)]
        if donor is not recipient and not accepted(recipient) & accepted(donor):
            pairs.append((recipient, donor))
    return pairs


def accepted(example: Example) -> set[str]:
    return {normalize_answer(gold) for gold in example.golds}


@dataclass(frozen=True)
class SwapRates:
    """Per k, the share of answers that are the original capital and that are the injected one (with 95% Wilson
    intervals over the pairs)."""

    num_layers: int
    pairs: int
    ks: list[int]
    original: list[float]
    injected: list[float]
    original_interval: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    injected_interval: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_swap(model: Transformer, tokenizer: Tokenizer, grid: LayerGrid, out_dir: str | os.PathLike, *,
             model_name: str, limit: int | None = None, batch_size: int = 32, seed: int = 0,
             progress: bool = True) -> Path:
    """Run (or continue) the swap experiment into out_dir/swap.jsonl; returns that path.

    limit: consider `limit` countries of the capitals data, spread evenly over it.
    """
    L = model.config.num_layers
    ks = [k for k in grid.values(L) if k < L]
    task = swap_task(limit)
    position, single = single_token_names(tokenizer, task)
    candidates = [example for example in task.examples if example.id in single]
    baseline = Condition(BASELINE, L)
    baseline_batches = length_sorted_batches(task, candidates, tokenizer, batch_size)
    settings = {"batch_size": batch_size, "tasks": {TASK_NAME: task_manifest(task, tokenizer)},
                "layers": ks, "seed": seed}
    with claimed_folder(out_dir, SWAP_FILE) as folder:
        claim_manifest(folder, model_manifest(model, model_name), "swap", settings)
        log = ResultLog(folder / SWAP_FILE, SWAP_FILE)
        check_records_match(log.done, [(baseline.key(TASK_NAME, example.id), list(prompt), list(example.golds))
                                       for batch in baseline_batches
                                       for example, prompt in zip(batch.examples, batch.prompts)], folder)
        try:
            # 1. Which of the single-token countries the model knows.
            for batch in baseline_batches:
                indices = missing(log, batch, baseline)
                if indices:
                    generations, = generate_answers(model, tokenizer, batch, [None],
                                                    batch_prompt_states(model, tokenizer, batch))
                    for index in indices:
                        log.write(make_record(batch, index, baseline, None, generations[index], model, model_name))
                    log.flush()
            known = [example for example in candidates
                     if log.done[baseline.key(TASK_NAME, example.id)]["scores"]["accuracy"] == 1.0]

            # 2. Each pair's country token swapped at every k.
            pairs = pair_up(known, seed)
            donor_of = {recipient.id: donor for recipient, donor in pairs}
            batches = length_sorted_batches(task, [recipient for recipient, _ in pairs], tokenizer, batch_size)
            with tqdm(total=len(batches) * len(ks), unit="batch", desc="swap", file=sys.stderr,
                      disable=not progress, dynamic_ncols=True) as bar:
                for batch in batches:
                    donors = [donor_of[example.id] for example in batch.examples]
                    swap_batch(model, tokenizer, batch, donors, position, ks, log, model_name)
                    bar.update(len(ks))
        finally:
            log.close()
        log.path.touch()  # a model that knows no single-token country still leaves its (empty) result
    return log.path


@torch.no_grad()
def donor_states(model: Transformer, tokenizer: Tokenizer, donors: list[Example]) -> torch.Tensor:
    """H [L+1, B, D] of the last token of each donor prompt "The country X"."""
    ids = [tokenizer.encode(DONOR_TEMPLATE.format(country=donor.fields["country"])) for donor in donors]
    prompts, mask = left_pad(ids, tokenizer.pad_id, model.embed_tokens.weight.device)
    return model.residual_stream(prompts, mask)[:, :, -1]


def swap_batch(model: Transformer, tokenizer: Tokenizer, batch: Batch, donors: list[Example], position: int,
               ks: list[int], log: ResultLog, model_name: str) -> None:
    """Generate the batch with each recipient's country token swapped for its donor's, at every k."""
    todo = {k: missing(log, batch, Condition("swap", k)) for k in ks}
    if not any(todo.values()):
        return
    states = donor_states(model, tokenizer, donors)
    prompt_states = batch_prompt_states(model, tokenizer, batch)
    for k, indices in todo.items():
        if not indices:
            continue
        swap = Manipulation("swap", k, positions=(position,), vectors=states[k][:, None],
                            description=f"country token <- last token of '{DONOR_TEMPLATE}' at layer {k}")
        generations, = generate_answers(model, tokenizer, batch, [swap], prompt_states)
        for index in indices:
            record = make_record(batch, index, Condition("swap", k), swap, generations[index], model, model_name)
            donor = donors[index]
            record["donor"] = donor.id
            record["donor_golds"] = list(donor.golds)
            record["scores"] = {"original": record["scores"]["accuracy"],
                                "injected": accuracy(record["prediction"], donor.golds)["accuracy"]}
            log.write(record)
        log.flush()


def swap_rates(out_dir: str | os.PathLike) -> SwapRates:
    """Original and injected answer rates per k from out_dir/swap.jsonl, ending with k = L (no swap)."""
    path = Path(out_dir) / SWAP_FILE
    if not path.exists():
        raise SweepError(f"{out_dir}: no swap results ({SWAP_FILE})")
    records = read_records([path])
    manifest = Path(out_dir) / MANIFEST_FILE
    if records:
        L = next(iter(records.values()))["num_layers"]
    elif manifest.exists():
        L = json.loads(manifest.read_text(encoding="utf-8"))["num_layers"]
    else:
        raise SweepError(f"{path}: no records, and no {MANIFEST_FILE} to say which model ran")
    swaps = [record for record in records.values() if record["kind"] == "swap"]
    if not swaps:  # the model knew no single-token country
        return SwapRates(L, 0, [], [], [])
    by_k: dict[int, list[dict]] = defaultdict(list)
    for record in swaps:
        by_k[record["k"]].append(record["scores"])
    # k = L: each recipient's baseline answer, scored against its own and its donor's capital.
    pairs = {(record["example"], record["donor"]): record["donor_golds"] for record in swaps}
    for (recipient, _), donor_golds in sorted(pairs.items()):
        baseline = records[Condition(BASELINE, L).key(TASK_NAME, recipient)]
        by_k[L].append({"original": baseline["scores"]["accuracy"],
                        "injected": accuracy(baseline["prediction"], donor_golds)["accuracy"]})
    ks = sorted(by_k)
    counts = {k: (sum(s["original"] for s in by_k[k]), sum(s["injected"] for s in by_k[k]), len(by_k[k])) for k in ks}
    return SwapRates(L, len(pairs), ks, [counts[k][0] / counts[k][2] for k in ks],
                     [counts[k][1] / counts[k][2] for k in ks],
                     [wilson(int(counts[k][0]), counts[k][2]) for k in ks],
                     [wilson(int(counts[k][1]), counts[k][2]) for k in ks])
