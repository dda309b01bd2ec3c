"""The complete example of docs/evals.md runs as written, on the embedded SmolLM2."""

import csv
import inspect
import re
import types
from pathlib import Path

import pytest

import evals.api
from evals.sweep import aggregate, load_results, run_sweep

DOC = Path(__file__).resolve().parents[1] / "docs" / "evals.md"
MARKER = "<!-- tests/test_docs_example.py runs this block -->"


def example_code() -> str:
    after = DOC.read_text(encoding="utf-8").split(MARKER, 1)[1]
    block = re.match(r"\s*```python\n(.*?)```", after, re.DOTALL)
    assert block, f"{DOC}: no python block after {MARKER}"
    return block.group(1)


def returns_results_in_memory() -> bool:
    return inspect.signature(run_sweep).parameters["out_dir"].default is None


def in_memory_stand_in(folder: Path):
    """run_sweep as docs/evals.md describes it, for a tree whose run_sweep still needs a folder.

    The documented contract: with out_dir=None, run_sweep returns its result in memory (records and
    per-task summaries) and writes nothing. Until the sweep runner gives that, this runs it into a
    folder outside the working directory and reads the result back.
    """
    def run(model, tokenizer, tasks, kinds, grid, out_dir=None, **options):
        run_sweep(model, tokenizer, tasks, kinds, grid, out_dir or folder, progress=False, **options)
        records = list(load_results(out_dir or folder).values())
        return types.SimpleNamespace(records=records, summaries=aggregate(records))
    return run


@pytest.mark.slow
def test_the_complete_example_in_docs_evals_md_runs(tmp_path, monkeypatch):
    code = example_code()
    assert len(code.strip().splitlines()) <= 16
    if not returns_results_in_memory():
        monkeypatch.setattr(evals.api, "run_sweep", in_memory_stand_in(tmp_path / "outside"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})  # noqa: S102 - our own doc

    assert sorted(path.name for path in work.iterdir()) == ["my-capitals.csv", "my-capitals.png"]  # nothing else
    assert (work / "my-capitals.png").stat().st_size > 1000
    with open(work / "my-capitals.csv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {row["task"] for row in rows} == {"my-capitals"}
    assert {int(row["k"]) for row in rows if row["kind"] == "random"} == {*range(0, 30, 3), 30}
    assert {int(row["k"]) for row in rows if row["kind"] == "freeze"} == {1, *range(3, 30, 3), 30}
