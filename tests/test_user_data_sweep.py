"""A user's own data files, swept from the command line end to end (a tiny random Llama keeps it fast).

What the loaders and prompt options do on their own is in test_evals_loaders.py / test_evals_tasks.py;
here the files go through `minillm sweep` into a result folder, as a researcher would run them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.cli import main
from evals.results import load_results

pytestmark = pytest.mark.usefixtures("one_thread")


SQUAD = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
    {"context": f"{name} was born in {town}.",
     "qas": [{"id": f"q{index}", "question": f"Where was {name} born?", "answers": [{"text": town}]}]}
    for index, (name, town) in enumerate([("Ada", "London"), ("Alan", "Paddington"), ("Grace", "New York"),
                                          ("Edsger", "Rotterdam"), ("Barbara", "Chicago")])]}]}
# Non-default field names, one of them nested: question=prompt_text, answers=gold.aliases, id=uid
JSONL_ROWS = [{"uid": f"r{index}", "prompt_text": f"What is {index} plus one?", "gold": {"aliases": [str(index + 1)]}}
              for index in range(5)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sweep_argv(tiny_dir: Path, out: Path, *data: str) -> list[str]:
    return ["sweep", "--model", str(tiny_dir), "--manipulation", "freeze", "--layers", "0:4:2", "--batch-size", "2",
            "--out", str(out), *data]


def test_a_squad_file_and_a_jsonl_file_with_other_field_names_swept_with_one_shot(tiny_dir, tmp_path, capsys):
    squad = tmp_path / "squad_small.json"
    squad.write_text(json.dumps(SQUAD), encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "sums.jsonl", JSONL_ROWS)
    out = tmp_path / "run"
    argv = sweep_argv(tiny_dir, out, "--data", str(squad), "--format", "squad", "--name", "mysquad",
                      "--data", str(jsonl), "--format", "qa-jsonl",
                      "--fields", "question=prompt_text,answers=gold.aliases,id=uid", "--name", "sums",
                      "--shots", "1")
    assert main(argv) == 0
    table = capsys.readouterr().out
    records = list(load_results(out).values())
    for task, rows in (("mysquad", SQUAD["data"][0]["paragraphs"]), ("sums", JSONL_ROWS)):
        mine = [record for record in records if record["task"] == task]
        assert mine, f"no records for {task}"
        scored = {record["example"] for record in mine}
        assert len(scored) == len(rows) - 1  # one example is the demonstration, never scored
        for record in mine:
            # the prompt holds exactly one solved demonstration before the scored question
            answer_lines = [line for line in record["prompt"].splitlines() if line.startswith(("A:", "Answer:"))]
            assert len(answer_lines) == 2 and answer_lines[-1] in ("A:", "Answer:"), record["prompt"]
        assert task in table  # the closing results table names every task
    squad_prompt = next(r["prompt"] for r in records if r["task"] == "mysquad")
    assert "was born in" in squad_prompt  # the reading task's context reached the prompt
    jsonl_golds = {r["example"]: r["golds"] for r in records if r["task"] == "sums"}
    assert all(golds == [str(int(example[1:]) + 1)] for example, golds in jsonl_golds.items())


def test_two_data_jsonl_files_from_different_folders_swept_into_one_folder_are_both_kept(tiny_dir, tmp_path):
    first = write_jsonl(tmp_path / "a" / "data.jsonl", [{"id": f"x{i}", "question": f"A{i}?", "answers": ["a"]}
                                                        for i in range(3)])
    second = write_jsonl(tmp_path / "b" / "data.jsonl", [{"id": f"x{i}", "question": f"B{i}?", "answers": ["b"]}
                                                         for i in range(3)])
    together = tmp_path / "together"
    assert main(sweep_argv(tiny_dir, together, "--data", str(first), "--format", "qa-jsonl",
                           "--data", str(second), "--format", "qa-jsonl")) == 0
    records = list(load_results(together).values())
    tasks = {record["task"] for record in records}
    assert len(tasks) == 2
    assert len(records) == 2 * 3 * 3  # two tasks x three examples x (baseline, k=0 as 1, k=2)

    # one after the other into one folder: the second file is a new task, not "already done"
    apart = tmp_path / "apart"
    assert main(sweep_argv(tiny_dir, apart, "--data", str(first), "--format", "qa-jsonl")) == 0
    assert main(sweep_argv(tiny_dir, apart, "--data", str(second), "--format", "qa-jsonl")) == 0
    kept = list(load_results(apart).values())
    assert len(kept) == len(records)
    assert {record["prompt"] for record in kept} == {record["prompt"] for record in records}


def test_an_edited_data_file_is_refused_on_resume(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"id": f"x{i}", "question": f"Q{i}?", "answers": ["a"]}
                                               for i in range(3)])
    out = tmp_path / "run"
    argv = sweep_argv(tiny_dir, out, "--data", str(data), "--format", "qa-jsonl", "--name", "qa")
    assert main(argv) == 0
    before = (out / "results.jsonl").read_bytes()
    write_jsonl(data, [{"id": f"x{i}", "question": f"Q{i}?", "answers": ["b" if i == 1 else "a"]} for i in range(3)])
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("minillm: error:") and "\n" not in error and "qa" in error
    assert (out / "results.jsonl").read_bytes() == before


def test_a_prompt_longer_than_the_context_is_refused_by_task_and_example_before_anything_runs(tiny_dir, tmp_path,
                                                                                            capsys):
    rows = [{"id": f"x{i}", "question": f"Q{i}?", "answers": ["a"]} for i in range(3)]
    rows[1]["question"] = "long " * 900  # 4500 byte-level tokens, past the tiny model's 4096 positions
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "run"
    assert main(sweep_argv(tiny_dir, out, "--data", str(data), "--format", "qa-jsonl", "--name", "qa")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("minillm: error: task 'qa', example 'qa-2': its prompt has ")  # line 2 of the file and "\n" not in error
    assert "beyond the model's context of 4096" in error
    assert not (out / "results.jsonl").exists()
