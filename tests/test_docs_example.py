"""The complete example of docs/evals.md runs as written, on the embedded SmolLM2."""

import csv
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "evals.md"
MARKER = "<!-- tests/test_docs_example.py runs this block -->"


def example_code() -> str:
    after = DOC.read_text(encoding="utf-8").split(MARKER, 1)[1]
    block = re.match(r"\s*```python\n(.*?)```", after, re.DOTALL)
    assert block, f"{DOC}: no python block after {MARKER}"
    return block.group(1)


@pytest.mark.slow
def test_the_complete_example_in_docs_evals_md_runs(tmp_path, monkeypatch):
    code = example_code()
    assert len(code.strip().splitlines()) <= 16
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
