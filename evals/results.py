"""Result files: one JSON line per generated answer, read back, appended to, and resumed.

Run directory
-------------
    results.jsonl                   records of an unsharded sweep
    results.shard-I-of-N.jsonl      records of shard I of N
    swap.jsonl                      records of the swap experiment (`evals.swap`)

Each line is one record (see `make_record`): task, example id, kind, k, seed, prompt token
ids, generation, prediction, scores, the manipulation's `to_dict()` and the model. Records carry
no timestamps, so the same command gives the same bytes; a record's key is
(task, example, kind, k, seed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from minillm.manipulation import Manipulation
from minillm.model import Transformer

if TYPE_CHECKING:  # only for annotations: evals.sweep imports this module
    from evals.sweep import Batch, Condition

RESULTS_GLOB = "results*.jsonl"


class SweepError(ValueError):
    """Arguments a sweep cannot run with, or a run directory it cannot continue."""


def record_key(record: dict) -> tuple:
    """What identifies a record: (task, example id, kind, k, seed)."""
    return record["task"], record["example"], record["kind"], record["k"], record["seed"]


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


def load_results(out_dir: str | os.PathLike) -> dict[tuple, dict]:
    """Every sweep record of a run directory (all shards), by key."""
    paths = list(Path(out_dir).glob(RESULTS_GLOB))
    if not paths:
        raise SweepError(f"{out_dir}: no sweep results (no {RESULTS_GLOB} files)")
    return read_records(paths)


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
