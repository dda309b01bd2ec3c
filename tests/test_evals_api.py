"""The public Python API: tasks from pairs and files, the sweep call, plotting to a str path."""

import json
import types
from pathlib import Path

import pytest

import evals
import evals.api
from evals.sweep import LayerGrid, aggregate


def test_task_from_pairs_and_from_two_lists():
    pairs = [("Capital of Peru?", "Lima"), ("Two plus two?", ["4", "four", "4"]), ("Capital of Chad?", "N'Djamena")]
    task = evals.task_from_pairs(pairs, name="mine")
    assert [example.golds for example in task.examples] == [("Lima",), ("4", "four"), ("N'Djamena",)]
    assert task.prompt(task.examples[0]) == "Q: Capital of Peru?\nA:" and task.shots == ()
    assert task.score(" Lima\nQ: next", task.examples[0])["exact_match"] == 1.0
    same = evals.task_from_pairs([question for question, _ in pairs], [answer for _, answer in pairs], name="mine")
    assert same == task
    raw = evals.task_from_pairs(pairs, template="{question}", shots=1, seed=2)
    assert len(raw.shots) == 1 and len(raw.examples) == 2
    shot = raw.shots[0]
    question = raw.examples[0].fields["question"]
    assert raw.prompt(raw.examples[0]) == f"{shot.fields['question']} {shot.golds[0]}\n\n{question}"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: evals.task_from_pairs(["a?", "b?"], ["x"]), "2 questions but 1 answers"),
        (lambda: evals.task_from_pairs([("a?", "x", "y")]), r"pair 0: expected \(question, answers\)"),
        (lambda: evals.task_from_pairs([("a?", "")]), "needs non-empty gold"),
        (lambda: evals.task_from_pairs([("a?", "x")], template="{prompt}"), "no field 'prompt'"),
    ],
)
def test_task_from_pairs_refuses_what_it_cannot_score(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_task_from_file_takes_the_command_line_options(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}?", "a": f"a{i}"}) + "\n" for i in range(9)), encoding="utf-8")
    task = evals.task_from_file(path, "qa-jsonl", fields="question=q,answers=a", shots=1, limit=4,
                                template="Question: {question}\nAnswer:", max_new_tokens=5)
    assert len(task.shots) == 1 and len(task.examples) == 4 and task.max_new_tokens == 5
    assert task.prompt(task.examples[0]).count("Answer:") == 2


def test_sweep_passes_the_documented_call_to_the_sweep_runner(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(evals.api, "run_sweep", lambda *args, **kwargs: calls.append((args, kwargs)) or "result")
    task = evals.task_from_pairs([("a?", "x"), ("b?", "y")])
    tokenizer = types.SimpleNamespace(source=tmp_path / "smollm2-135m")
    assert evals.sweep("model", tokenizer, task, kinds=["freeze"], layers="0::3") == "result"
    (model, _, tasks, kinds, grid, out_dir), options = calls[0]
    assert model == "model"
    assert tasks == [task] and kinds == ["freeze"] and grid == LayerGrid(0, None, 3) and out_dir is None
    assert options == {"seeds": 1, "batch_size": 16, "model_name": "smollm2-135m"}


def _records():
    for kind, k, score in (("baseline", 4, 1.0), ("freeze", 1, 0.0), ("freeze", 2, 1.0)):
        yield {"task": "mine", "example": "e", "kind": kind, "k": k, "seed": None, "num_layers": 4,
               "metric": "exact_match", "chance": 0.0, "scores": {"exact_match": score}}


def test_plot_accepts_a_str_path_and_a_result_or_its_summaries(tmp_path):
    summaries = aggregate(_records())
    written = evals.plot(types.SimpleNamespace(summaries=summaries), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "curves.csv").is_file()
    assert [Path(path).name for path in written] == ["curves.png", "curves.csv"]
    evals.plot(summaries, tmp_path / "again.png")
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "curves.csv").read_text()
