"""Tasks and prompts from command-line options: user files, shots, templates, limits, chat, `minillm tasks`."""

import argparse
import json
import sys
import types

import pytest

from evals.loaders import DataError
from evals.task_options import (
    add_task_arguments,
    register_task_commands,
    tasks_from_arguments,
)
from evals.tasks import TASKS, get_task

SQUAD = {"data": [{"title": "t", "paragraphs": [
    {"context": f"Keeper number {i} of the Morrow light was called Ada {name}.",
     "qas": [{"id": f"q{i}", "question": f"What was keeper {i} called?", "answers": [{"text": f"Ada {name}"}]}]}
    for i, name in enumerate(["Venn", "Holt", "Marr", "Quill", "Dane"])]}]}
NESTED_ROWS = [{"key": f"k{i}", "ask": {"text": f"Capital number {i}?"}, "gold": [{"text": f"City {i}"}]}
               for i in range(6)]


def parse(*argv):
    parser = argparse.ArgumentParser(prog="minillm sweep")
    parser.add_argument("--model", default="smollm2-135m")
    add_task_arguments(parser)
    return parser.parse_args(list(argv))


def tasks(*argv, tokenizer=None):
    return tasks_from_arguments(parse(*argv), tokenizer)


@pytest.fixture
def files(tmp_path):
    squad = tmp_path / "keepers.json"
    squad.write_text(json.dumps(SQUAD), encoding="utf-8")
    nested = tmp_path / "capitals.jsonl"
    nested.write_text("".join(json.dumps(row) + "\n" for row in NESTED_ROWS), encoding="utf-8")
    return squad, nested


def test_a_squad_file_and_a_jsonl_file_with_other_field_names_with_one_shot(files):
    squad, nested = files
    keepers, capitals = tasks("--data", str(squad), "--data", str(nested), "--format", "qa-jsonl",
                              "--fields", "question=ask.text,answers=gold.text,id=key", "--shots", "1")
    assert len(keepers.shots) == 1 and len(keepers.examples) == 4
    assert len(capitals.shots) == 1 and len(capitals.examples) == 5
    for task, answer_cue in ((keepers, "\nAnswer:"), (capitals, "\nA:")):
        shot = task.shots[0]
        assert shot.id not in {example.id for example in task.examples}  # a demonstration is never scored
        for example in task.examples:
            prompt = task.prompt(example)
            assert prompt.count(answer_cue) == 2  # one demonstration, then the question
            assert prompt.startswith(task.template.format(**shot.fields) + " " + shot.golds[0])
            assert prompt.endswith(task.template.format(**example.fields))
    assert capitals.shots[0].fields == {"question": f"Capital number {capitals.shots[0].id[1:]}?"}
    assert {example.id for example in capitals.examples} | {capitals.shots[0].id} == {f"k{i}" for i in range(6)}


def test_shots_are_drawn_by_seed(files):
    squad, _ = files
    draws = {tuple(shot.id for shot in tasks("--data", str(squad), "--shots", "2", "--seed", str(seed))[0].shots)
             for seed in range(8)}
    assert len(draws) > 1
    assert tasks("--data", str(squad), "--shots", "2", "--seed", "3")[0] == tasks("--data", str(squad), "--shots",
                                                                                  "2", "--seed", "3")[0]
    assert tasks("--data", str(squad), "--shots", "0")[0].shots == ()
    with pytest.raises(ValueError, match="no example to score"):
        tasks("--data", str(squad), "--shots", "5")


def test_two_data_jsonl_files_from_different_folders_are_two_tasks(tmp_path):
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "data.jsonl")
        paths[-1].write_text('{"question": "q?", "answers": "x"}\n{"question": "r?", "answers": "y"}\n')
    first, second = tasks("--data", str(paths[0]), "--format", "qa-jsonl", "--data", str(paths[1]),
                          "--format", "qa-jsonl")
    assert first.name != second.name and first.examples[0].id == second.examples[0].id
    with pytest.raises(ValueError, match="two tasks are named 'mine'.*give one of them --name"):
        tasks("--data", str(paths[0]), "--format", "qa-jsonl", "--name", "mine",
              "--data", str(paths[1]), "--format", "qa-jsonl", "--name", "mine")
    with pytest.raises(ValueError, match="two tasks are named 'capitals'"):
        tasks("--task", "capitals", "--data", str(paths[0]), "--format", "qa-jsonl", "--name", "capitals")


def test_builtin_task_names_are_checked(files):
    with pytest.raises(ValueError, match="names 'capitals' twice"):
        tasks("--task", "capitals,capitals")
    with pytest.raises(ValueError, match="unknown task 'squad'.*--data PATH"):
        tasks("--task", "squad")
    with pytest.raises(ValueError, match="no task"):
        tasks()
    assert [task.name for task in tasks("--task", "capitals,summarization")] == ["capitals", "summarization"]


def test_options_describe_the_source_they_follow(capsys):
    cases = [(["--format", "squad", "--data", "x.json"], "put it after the one it describes"),
             (["--data", "x.jsonl", "--split", "train"], "--split applies to --hf-dataset"),
             (["--data", "x.jsonl", "--name", "a", "--name", "b"], "--name is given twice"),
             (["--shots", "-1"], "must be at least 0"),
             (["--limit", "0"], "must be at least 1"),
             (["--max-new-tokens", "0"], "must be at least 1")]
    for argv, message in cases:
        parser = argparse.ArgumentParser()
        add_task_arguments(parser)
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_bad_data_is_one_line_naming_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q?", "answers": "x"}\n{"question": "r?"}\n')
    with pytest.raises(DataError, match=rf'^{path}:2: missing field "answers"$'):
        tasks("--data", str(path), "--format", "qa-jsonl")
    with pytest.raises(DataError, match="say which format"):
        tasks("--data", str(path))


def test_template_from_text_or_file_and_unknown_fields(files, tmp_path):
    squad, nested = files
    [task] = tasks("--data", str(squad), "--shots", "0",
                   "--template", "Context: {context}\\nQ: {question}\\nShort answer:")
    assert task.prompt(task.examples[0]) == ("Context: Keeper number 0 of the Morrow light was called Ada Venn.\n"
                                             "Q: What was keeper 0 called?\nShort answer:")
    template_file = tmp_path / "prompt.txt"
    template_file.write_text("Text: {context}\nAsked: {question}\nReply:\n", encoding="utf-8")
    [from_file] = tasks("--data", str(squad), "--shots", "0", "--template", f"@{template_file}")
    assert from_file.prompt(from_file.examples[0]).endswith("Asked: What was keeper 0 called?\nReply:")
    with pytest.raises(ValueError, match=r"unknown field \{document\}.*its fields: \{question\}"):
        tasks("--data", str(nested), "--format", "qa-jsonl", "--fields", "question=ask.text,answers=gold.text",
              "--template", "{document}")
    with pytest.raises(ValueError, match="cannot read"):
        tasks("--task", "capitals", "--template", f"@{tmp_path / 'missing.txt'}")


def test_max_new_tokens_and_limit(files):
    [capitals] = tasks("--task", "capitals", "--max-new-tokens", "3", "--limit", "4")
    everything = get_task("capitals").examples
    assert capitals.max_new_tokens == 3
    assert capitals.examples == tuple(everything[int(i * len(everything) / 4)] for i in range(4))


def test_builtin_reading_task_keeps_drawing_by_default_and_seed_redraws():
    [default] = tasks("--task", "context-qa")
    assert default.shots == get_task("context-qa").shots and default.shot_seed == 0
    [reseeded] = tasks("--task", "context-qa", "--seed", "7")
    assert reseeded.shot_seed == 7 and len(reseeded.shots) == 2 and reseeded.shots != default.shots


def test_chat_renders_with_the_checkpoints_template_without_loading_the_model(files, smollm2_dir, monkeypatch):
    import minillm.checkpoint

    monkeypatch.setattr(minillm.checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    squad, _ = files
    [task] = tasks("--model", str(smollm2_dir), "--data", str(squad), "--shots", "1", "--chat")
    prompt = task.prompt(task.examples[0])
    shot = task.shots[0]
    assert prompt.startswith("<|im_start|>system\n")
    assert f"<|im_start|>assistant\n{shot.golds[0]}<|im_end|>\n" in prompt
    assert prompt.endswith(f"{task.template.format(**task.examples[0].fields)}<|im_end|>\n<|im_start|>assistant\n")
    assert task.settings()["chat_template_sha256"] is not None


def test_minillm_tasks_lists_every_builtin_task(capsys):
    parser = argparse.ArgumentParser(prog="minillm")
    commands = parser.add_subparsers(dest="command", required=True)
    register_task_commands(commands)
    args = parser.parse_args(["tasks"])
    args.run(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["task", "examples", "shots", "metric", "chance"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == list(TASKS)
    capitals = get_task("capitals")
    assert rows["capitals"][1:5] == [str(len(capitals.examples)), "3", "exact_match", f"{capitals.chance:.3f}"]


def test_hf_dataset_with_split_format_and_fields(monkeypatch):
    rows = {("trivia", "rc", "train"): [{"q": f"Capital number {i}?", "a": {"aliases": [f"City {i}"]}}
                                        for i in range(4)]}
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: rows[name, config, split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    [task] = tasks("--hf-dataset", "trivia:rc", "--split", "train", "--format", "qa-jsonl",
                   "--fields", "question=q,answers=a.aliases", "--shots", "1")
    assert task.name == "trivia:rc[train]" and len(task.shots) == 1 and len(task.examples) == 3
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install 'minillm\\[hf\\]'"):
        tasks("--hf-dataset", "squad")
