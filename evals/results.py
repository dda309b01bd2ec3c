"""Result folders: record files, the run manifest, and the lock that keeps one writer per file.

A result folder
---------------
    run.json                        the run manifest: what produced the records (see `claim_manifest`)
    results.jsonl                   records of an unsharded sweep
    results.shard-I-of-N.jsonl      records of shard I of N
    swap.jsonl                      records of the swap experiment (`evals.swap`)
    .results.jsonl.lock, ...        the lock files of the writers (see `claimed_folder`)

Each line of a record file is one record (see `evals.sweep.make_record`): task, example id, kind, k, seed,
the prompt (text and token ids), generation, prediction, gold answers, scores, the manipulation's
`to_dict()` and the model. Records carry no timestamps, so the same command gives the same bytes;
a record's key is (task, example, kind, k, seed). Task names are unique within a run, so two data
files that are both called `data.jsonl` stay two tasks as long as their tasks are named apart.

A folder never mixes runs. Before any work a run compares its manifest with the folder's run.json:

- a different model, checkpoint, dtype, minillm version, batch size, pack size, or a task whose examples,
  prompts, template, shots or max_new_tokens differ: refused, in one line naming the setting;
- more kinds, layers, seeds or tasks than the folder has: the same run, extended (it says so);
- then every stored record of the planned work must have been made from the same prompt and gold
  answers as the new one (a changed data file is refused, never skipped as done).

The checkpoint fingerprint is computed from the loaded model, so it is the same whether the weights
came from a folder, a GGUF file or Python: sha256 over every weight's name, shape, dtype and its
first and last 4096 values. That costs milliseconds even for 7B models, and any fine-tune or
re-initialisation changes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

from minillm.model import Transformer

RESULTS_GLOB = "results*.jsonl"
MANIFEST_FILE = "run.json"
RECORD_FIELDS = ("task", "example", "kind", "k", "seed", "num_layers", "model", "dtype", "metric", "chance",
                 "golds", "scores")
FINGERPRINT_VALUES = 4096  # values hashed from each end of every weight


class SweepError(ValueError):
    """Arguments a sweep cannot run with, or a run folder it cannot continue."""


# ----------------------------------------------------------------------------- records

def record_key(record: dict) -> tuple:
    """What identifies a record: (task, example id, kind, k, seed)."""
    return record["task"], record["example"], record["kind"], record["k"], record["seed"]


def dtype_name(model: Transformer) -> str:
    return str(model.embed_tokens.weight.dtype).removeprefix("torch.")


def parse_record(line: bytes, path: Path, number: int) -> dict:
    """One line of a record file, checked to be a record: an error names the file and the line."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise SweepError(f"{path}:{number}: not a JSON record ({reason}); fix or remove the line to continue") from None
    if not isinstance(record, dict):
        raise SweepError(f"{path}:{number}: not a result record (a JSON {type(record).__name__}, not an object); "
                         "fix or remove the line to continue")
    absent = [field for field in RECORD_FIELDS if field not in record]
    # a swap record scores its answer against two capitals ("original", "injected") instead of its metric
    if absent or not isinstance(record["scores"], dict) or (record["kind"] != "swap"
                                                            and record["metric"] not in record["scores"]):
        what = f"no field {absent[0]!r}" if absent else f"no score for its metric {record['metric']!r}"
        raise SweepError(f"{path}:{number}: not a result record ({what}); fix or remove the line to continue")
    return record


def complete_lines(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and the byte length of its complete lines.

    A last line without its newline is a write that was cut short (or, in another shard's file,
    one still being written): it is not a record.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = [parse_record(line, path, number) for number, line in enumerate(data[:end].splitlines(), start=1)]
    return records, end


def read_records(paths: Iterable[Path]) -> dict[tuple, dict]:
    """All records of these files by key; a key found twice keeps its first record."""
    records: dict[tuple, dict] = {}
    for path in sorted(paths):
        for record in complete_lines(path)[0]:
            records.setdefault(record_key(record), record)
    return records


def load_results(out_dir: str | os.PathLike) -> dict[tuple, dict]:
    """Every sweep record of a run folder (all shards merged), by key."""
    paths = list(Path(out_dir).glob(RESULTS_GLOB))
    if not paths:
        raise SweepError(f"{out_dir}: no sweep results (no {RESULTS_GLOB} files)")
    return read_records(paths)


# ----------------------------------------------------------------------------- one writer per file

_held: dict[Path, list] = {}  # lock path -> [open file, depth]: this process's locks, so that nesting works


@contextmanager
def writer_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on lock_path; another process holding it is refused at once."""
    lock_path = lock_path.resolve()
    if lock_path in _held:  # already ours (the CLI takes it before loading the model, run_sweep again)
        _held[lock_path][1] += 1
    else:
        handle = open(lock_path, "a")  # held across the yield, closed below
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SweepError(f"{lock_path.parent}: another process is writing {lock_path.stem.lstrip('.')} "
                             f"(it holds {lock_path.name}); wait for it to finish or use another --out") from None
        _held[lock_path] = [handle, 1]
    try:
        yield
    finally:
        _held[lock_path][1] -= 1
        if _held[lock_path][1] == 0:
            _held.pop(lock_path)[0].close()  # closing the file releases the flock


@contextmanager
def claimed_folder(out_dir: str | os.PathLike, filename: str) -> Iterator[Path]:
    """The output folder, created and checked writable, with this process as the only writer of `filename`.

    A run refused inside the block leaves no trace: a folder it created is removed again if nothing
    but lock files is in it.
    """
    folder = Path(out_dir)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SweepError(f"--out {folder}: exists and is not a folder") from None
    except OSError as error:
        raise SweepError(f"--out {folder}: cannot create it ({error.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SweepError(f"--out {folder}: not writable")
    lock_path = folder / f".{filename}.lock"
    try:
        with writer_lock(lock_path):
            yield folder
    except BaseException:
        if created and all(path.suffix == ".lock" for path in folder.iterdir()):  # only the claims' lock files
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
        raise


class ResultLog:
    """One process's result file, appended to, and the records the whole folder already holds.

    The caller holds the file's writer lock (`claimed_folder`). The file is created at the first
    record, so a run refused before any work leaves no file behind. Without a path the log only
    keeps its records in memory.
    """

    def __init__(self, path: Path | None, siblings_glob: str):
        self.done: dict[tuple, dict] = {}
        if path is not None:
            if path.exists():
                _, end = complete_lines(path)
                with open(path, "r+b") as existing:  # drop a partial last line left by a kill mid-write
                    existing.truncate(end)
            self.done = read_records(path.parent.glob(siblings_glob))
        self.path = path
        self._file = None

    def write(self, record: dict) -> None:
        if self.path is not None:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # closed by close()
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


# ----------------------------------------------------------------------------- the run manifest

def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def checkpoint_fingerprint(model: Transformer) -> str:
    """sha256 over each weight's name, shape, dtype and its first and last FINGERPRINT_VALUES values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        ends = torch.cat([flat[:FINGERPRINT_VALUES], flat[-FINGERPRINT_VALUES:]]).cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(ends.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def minillm_version() -> str:
    try:
        return metadata.version("minillm")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def model_manifest(model: Transformer, model_name: str) -> dict:
    """The part of a manifest that sweep and swap share: which model, exactly."""
    return {"minillm": minillm_version(), "model": model_name, "checkpoint": checkpoint_fingerprint(model),
            "dtype": dtype_name(model), "num_layers": model.config.num_layers}


# What a difference in each setting means, for the refusal message, in the order they are compared: the
# settings a user chooses come before the hashes that any of them would also change.
SETTING_NAMES = {
    "model": "model", "dtype": "dtype", "num_layers": "number of layers", "checkpoint": "checkpoint weights "
    "(another fingerprint)", "minillm": "minillm version", "batch_size": "batch size (--batch-size)",
    "pack_tokens": "cache slots decoded together (--pack-tokens)",
    "examples": "number of examples (--limit)", "template": "template", "shots": "shots (demonstrations)",
    "max_new_tokens": "max_new_tokens", "stop": "stop strings", "metric": "metric", "seed": "pairing seed (--seed)",
    "examples_sha256": "examples (an edited data file?)",
    "prompts_sha256": "rendered prompts (another tokenizer, template or shots?)",
}
EXTENDABLE = ("kinds", "layers", "seeds", "tasks")  # a run may add to these; everything else must match


def first_difference(old, new, path: str = "") -> tuple[str, object, object] | None:
    """The first setting (a dotted path) whose value differs, with both values; None when all agree.

    Only settings present on both sides are compared; dictionaries in SETTING_NAMES order, then by name.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        order = list(SETTING_NAMES)
        shared = sorted(old.keys() & new.keys(), key=lambda key: (order.index(key) if key in order else len(order), key))
        for key in shared:
            found = first_difference(old[key], new[key], f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def describe(path: str) -> str:
    """'sweep.tasks.capitals.examples' -> 'task capitals: number of examples (--limit)'."""
    parts = path.split(".")
    name = SETTING_NAMES.get(parts[-1], parts[-1])
    if len(parts) >= 3 and parts[-3] == "tasks":
        return f"task {parts[-2]}: {name}"
    return name


def extend(old: dict, new: dict) -> tuple[dict, list[str]]:
    """The manifest of the run extended by `new`, and what the extension adds, in words."""
    # Settings that must match (checked before this) are recorded as they are: batch size, the swap's seed.
    merged, added = old | {key: value for key, value in new.items() if key not in EXTENDABLE}, []
    for key in EXTENDABLE:
        if key not in new:
            continue
        if key == "tasks":
            fresh = [name for name in new["tasks"] if name not in old.get("tasks", {})]
            merged["tasks"] = old.get("tasks", {}) | {name: new["tasks"][name] for name in fresh}
            if fresh:
                added.append(f"tasks {', '.join(fresh)}")
        elif key == "seeds":
            merged["seeds"] = max(old.get("seeds", 0), new["seeds"])
            if new["seeds"] > old.get("seeds", 0):
                added.append(f"seeds {old.get('seeds', 0)} -> {new['seeds']}")
        else:
            fresh = [value for value in new[key] if value not in old.get(key, [])]
            merged[key] = sorted(set(old.get(key, [])) | set(new[key]))  # each list holds one type
            if fresh:
                added.append(f"{key} {', '.join(map(str, fresh))}")
    return merged, added


def claim_manifest(folder: Path, common: dict, section: str, settings: dict) -> list[str]:
    """Check this run against the folder's run.json and record it there; returns what it adds to the run.

    `common`: the model's manifest; `settings`: this experiment's (sweep or swap). Refuses, naming the
    setting, when the run differs from what the folder holds in anything but EXTENDABLE.
    """
    path = folder / MANIFEST_FILE
    with open(folder / f".{MANIFEST_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # shards start together: one at a time reads and rewrites run.json
        old = {}
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise SweepError(f"{path}: not a run manifest ({error.msg}); fix or remove it") from None
            if not isinstance(old, dict):
                raise SweepError(f"{path}: not a run manifest (a JSON object is expected)")
        elif any(folder.glob(RESULTS_GLOB)) or (folder / "swap.jsonl").exists():
            raise SweepError(f"{folder} holds results without a {MANIFEST_FILE}: what made them is unknown; "
                             "use another --out")
        fixed_old = {key: value for key, value in old.items() if key != section} | {
            section: {key: value for key, value in old.get(section, {}).items() if key not in EXTENDABLE}}
        fixed_new = common | {section: {key: value for key, value in settings.items() if key not in EXTENDABLE}}
        tasks_old, tasks_new = old.get(section, {}).get("tasks", {}), settings.get("tasks", {})
        difference = first_difference(fixed_old, fixed_new) or first_difference(
            {"tasks": tasks_old}, {"tasks": tasks_new}, section)
        if difference:
            setting, before, now = difference
            if setting.endswith(("_sha256", "checkpoint")):  # hashes: their values say nothing to a reader
                raise SweepError(f"{folder} holds results for other {describe(setting)}: use another --out")
            shown = lambda value: repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."  # noqa: E731
            raise SweepError(f"{folder} holds results for {describe(setting)} {shown(before)}, this run has "
                             f"{shown(now)}: use another --out")
        merged, added = extend(old.get(section, {}), settings)
        manifest = old | common | {section: merged}
        if manifest != old:
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(temporary, path)  # whole or not at all, even if killed
    if old.get(section) and added:
        print(f"{folder}: extending the run with {'; '.join(added)}", file=sys.stderr)
    return added


def check_records_match(done: dict[tuple, dict], expected: Iterable[tuple[tuple, list[int], list[str]]],
                        folder: Path) -> None:
    """Refuse when a stored record was made from another prompt or other gold answers than this run's.

    expected: (record key, prompt token ids, gold answers) of every planned answer.
    """
    for key, prompt_ids, golds in expected:
        record = done.get(key)
        if record is None:
            continue
        for field, value in (("prompt_ids", prompt_ids), ("golds", golds)):
            if record.get(field) != value:
                task, example, kind, k, seed = key
                what = "prompt" if field == "prompt_ids" else "gold answers"
                raise SweepError(f"{folder}: the stored record of task {task} example {example!r} ({kind}, k={k}) "
                                 f"has another {what} than this run's: the data changed; use another --out")
