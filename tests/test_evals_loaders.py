"""Loaders on small files written by the tests, including malformed ones."""

import json
import sys
import types

import pytest

from evals.loaders import (
    DataError,
    default_task_name,
    load_cnn_dailymail,
    load_data,
    load_hf,
    load_hf_qa,
    load_hf_summarization,
    load_jsonl_qa,
    load_jsonl_summarization,
    load_squad,
    load_xsum,
)
from evals.tasks import FACTOID_TEMPLATE, READING_TEMPLATE, SUMMARY_TEMPLATE, with_shots

SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "Lighthouses",
            "paragraphs": [
                {
                    "context": "The lighthouse at Cape Morrow was lit in 1871 and painted red in 1902.",
                    "qas": [
                        {"id": "q1", "question": "When was the lighthouse lit?",
                         "answers": [{"text": "1871", "answer_start": 36}, {"text": "1871", "answer_start": 36},
                                     {"text": "in 1871", "answer_start": 33}]},
                        {"id": "q2", "question": "Who owns the lighthouse?", "answers": [], "is_impossible": True},
                    ],
                },
                {
                    "context": "Its keeper, Ada Venn, kept goats.",
                    "qas": [{"id": "q3", "question": "What did the keeper keep?",
                             "answers": [{"text": "goats", "answer_start": 27}]}],
                },
            ],
        }
    ],
}


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, rows):
    return write(path, "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


# --- SQuAD -----------------------------------------------------------------------------------

def test_load_squad(tmp_path):
    # Zero shots: all the data is scored (a reading task draws its demonstrations from its own data).
    task = with_shots(load_squad(write(tmp_path / "dev.json", json.dumps(SQUAD, indent=1))), 0)
    assert task.name == default_task_name(tmp_path / "dev.json") and task.template == READING_TEMPLATE
    assert [example.id for example in task.examples] == ["q1", "q3"]  # the unanswerable q2 is skipped
    first = task.examples[0]
    assert first.golds == ("1871", "in 1871")  # duplicates merged, order kept
    context = SQUAD["data"][0]["paragraphs"][0]["context"]
    assert first.fields == {"question": "When was the lighthouse lit?", "context": context}
    assert task.prompt(first).endswith(
        "Passage: The lighthouse at Cape Morrow was lit in 1871 and painted red in 1902.\n"
        "Question: When was the lighthouse lit?\nAnswer:")
    assert task.score("in 1871.", first)["exact_match"] == 1.0
    with_one_shot = load_squad(tmp_path / "dev.json")
    assert len(with_one_shot.shots) == 1 and len(with_one_shot.examples) == 1  # never all the data as shots
    assert len(load_squad(tmp_path / "dev.json", limit=1).examples) == 1


def test_load_squad_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.json", '{\n  "data": [\n    {"title": "x",, }\n  ]\n}\n')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        load_squad(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["data"][0]["paragraphs"][1]["qas"][0].pop("question"),
         r'data\[0\]\.paragraphs\[1\]\.qas\[0\]: missing field "question"'),
        (lambda d: d["data"][0]["paragraphs"][0].pop("context"),
         r'data\[0\]\.paragraphs\[0\]: missing field "context"'),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers="1871"),
         r'qas\[0\]: field "answers" must be a list'),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"].append(["1871"]),
         r'qas\[0\]: field "answers.text": answers\[3\] is not an object with field "text"'),
        (lambda d: d.pop("data"), r'missing field "data"'),
    ],
)
def test_load_squad_structure_errors_name_the_place(tmp_path, edit, message):
    data = json.loads(json.dumps(SQUAD))
    edit(data)
    path = write(tmp_path / "bad.json", json.dumps(data))
    with pytest.raises(DataError, match=message) as error:
        load_squad(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


# --- JSONL QA --------------------------------------------------------------------------------

def test_load_jsonl_qa_closed_book_and_with_context(tmp_path):
    rows = [{"q": "Capital of Peru?", "a": "Lima", "ctx": "Peru's capital is Lima."},
            {"q": "Capital of Chad?", "a": ["N'Djamena", "Ndjamena"], "ctx": "Chad's capital is N'Djamena."},
            {"q": "Boiling point of water in Celsius?", "a": 100, "ctx": "Water boils at 100 degrees."}]
    path = jsonl(tmp_path / "mine.jsonl", rows)

    closed = load_jsonl_qa(path, question="q", answers="a")
    assert closed.name == default_task_name(path) and closed.template == FACTOID_TEMPLATE
    assert [example.id for example in closed.examples] == ["mine-1", "mine-2", "mine-3"]
    assert [example.golds for example in closed.examples] == [("Lima",), ("N'Djamena", "Ndjamena"), ("100",)]
    assert closed.prompt(closed.examples[0]).endswith("\nQ: Capital of Peru?\nA:")

    reading = with_shots(load_jsonl_qa(path, question="q", answers="a", context="ctx", name="mine"), 0)
    assert reading.name == "mine" and reading.template == READING_TEMPLATE and len(reading.examples) == 3
    assert reading.examples[1].fields == {"question": "Capital of Chad?", "context": "Chad's capital is N'Djamena."}


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    rows = [{"question": f"q{i}?", "answers": ["a"]} for i in range(5)] + ["", '{"question": "q7?", "answers": [}']
    path = jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=r"qa\.jsonl:7: invalid JSON"):
        load_jsonl_qa(path)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"question": "q?"}, r':3: missing field "answers"'),
        ({"question": "q?", "answers": {"a": 1}}, r':3: field "answers" must be a string or a list of strings'),
        ({"question": "q?", "answers": [["nested"]]}, r':3: field "answers" must be a string or a list of strings'),
        ({"question": ["q?"], "answers": "a"}, r':3: field "question" must be a string, not a list'),
        (["question", "answers"], r":3: expected a JSON object, got list"),
    ],
)
def test_jsonl_qa_malformed_rows(tmp_path, bad_row, message):
    good_rows = [{"question": "a?", "answers": "x"}, {"question": "b?", "answers": "y"}]
    path = jsonl(tmp_path / "qa.jsonl", [*good_rows, bad_row])
    with pytest.raises(DataError, match=message) as error:
        load_jsonl_qa(path)
    assert str(error.value).startswith(f"{path}:3: ")


def test_jsonl_duplicate_ids_are_an_error(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"id": 7, "question": "a?", "answers": "x"},
                                         {"id": "7", "question": "b?", "answers": "y"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: duplicate id '7'"):
        load_jsonl_qa(path, id_field="id")


def test_jsonl_without_any_answerable_question(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answers": []}])
    with pytest.raises(DataError, match="no answerable questions"):
        load_jsonl_qa(path)


# --- JSONL summarization ---------------------------------------------------------------------

DOCUMENT = "The harbour wall at Kells was rebuilt after winter storms. Fishing boats return next week."


def test_load_xsum_and_cnn_dailymail_field_names(tmp_path):
    xsum_row = {"id": "x1", "document": DOCUMENT, "summary": "Kells wall rebuilt."}
    xsum = load_xsum(jsonl(tmp_path / "xsum.jsonl", [xsum_row]))
    assert xsum.name == default_task_name(tmp_path / "xsum.jsonl")
    assert xsum.template == SUMMARY_TEMPLATE and xsum.metric == "rouge"
    assert xsum.examples[0].id == "x1" and xsum.examples[0].golds == ("Kells wall rebuilt.",)
    assert xsum.prompt(xsum.examples[0]).endswith(f"Article: {DOCUMENT}\nSummary:")

    highlights = "Kells harbour wall rebuilt .\nBoats return next week ."
    cnn_row = {"id": "c1", "article": DOCUMENT, "highlights": highlights}
    cnn = load_cnn_dailymail(jsonl(tmp_path / "cnn.jsonl", [cnn_row]))
    assert cnn.examples[0].fields == {"document": DOCUMENT} and cnn.examples[0].golds == (highlights,)
    same_sentences = cnn.score("Kells harbour wall rebuilt. Boats return next week.", cnn.examples[0])
    assert same_sentences["rougeLsum"] == pytest.approx(1.0)


def test_summarization_missing_field_names_file_and_line(tmp_path):
    rows = [{"document": DOCUMENT, "summary": "s1"}, {"document": DOCUMENT, "summary": "s2"},
            {"document": DOCUMENT, "abstract": "s3"}]
    path = jsonl(tmp_path / "news.jsonl", rows)
    with pytest.raises(DataError, match=r'news\.jsonl:3: missing field "summary"'):
        load_jsonl_summarization(path)
    with pytest.raises(DataError, match=r'news\.jsonl:1: missing field "article"'):
        load_cnn_dailymail(path)


def test_summarization_empty_summary_is_an_error(tmp_path):
    path = jsonl(tmp_path / "news.jsonl", [{"document": DOCUMENT, "summary": "  "}])
    with pytest.raises(DataError, match=r'news\.jsonl:1: field "summary" is empty'):
        load_jsonl_summarization(path)


# --- Hugging Face datasets -------------------------------------------------------------------

def test_hf_loader_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf_qa("squad")


def test_hf_loaders_with_a_stand_in_datasets_module(monkeypatch):
    calls = []
    tables = {
        "squad": [{"id": "s1", "title": "t", "context": "Ada Venn kept goats.", "question": "What did Ada keep?",
                   "answers": {"text": ["goats", "goats"], "answer_start": [14, 14]}},
                  {"id": "s2", "title": "t", "context": "No answer here.", "question": "Why?",
                   "answers": {"text": [], "answer_start": []}}],
        "cnn_dailymail": [{"id": "c1", "article": DOCUMENT, "highlights": "Wall rebuilt."}],
    }

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return tables[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    qa = load_hf_qa("squad")
    assert [(example.id, example.golds) for example in qa.examples] == [("s1", ("goats",))]
    assert qa.examples[0].fields["context"] == "Ada Venn kept goats." and qa.name == "squad[validation]"

    news = load_hf_summarization("cnn_dailymail", config="3.0.0", split="test",
                                 document="article", summary="highlights")
    assert news.examples[0].golds == ("Wall rebuilt.",)
    assert calls == [("squad", None, "validation"), ("cnn_dailymail", "3.0.0", "test")]

    with pytest.raises(DataError, match=r'cnn_dailymail\[validation\] row 0: missing field "document"'):
        load_hf_summarization("cnn_dailymail")


# --- the command line's entry points: formats, roles, names, encodings -------------------------

def test_two_data_jsonl_files_in_different_folders_are_two_tasks(tmp_path):
    rows = [{"question": "a?", "answers": "x"}, {"question": "b?", "answers": "y"}]
    first = load_data(jsonl((tmp_path / "one").mkdir() or tmp_path / "one" / "data.jsonl", rows), "qa-jsonl")
    second = load_data(jsonl((tmp_path / "two").mkdir() or tmp_path / "two" / "data.jsonl", rows), "qa-jsonl")
    assert first.name != second.name
    assert first.name.startswith("data-") and second.name.startswith("data-")
    assert load_data(tmp_path / "one" / "data.jsonl", "qa-jsonl").name == first.name  # stable
    assert load_data(tmp_path / "one" / "data.jsonl", "qa-jsonl", name="mine").name == "mine"


def test_fields_map_roles_to_nested_fields(tmp_path):
    rows = [{"uid": "u1", "query": {"text": "Capital of Peru?"}, "passage": "Peru's capital is Lima.",
             "gold": [{"text": "Lima"}, {"text": "Lima, Peru"}]},
            {"uid": "u2", "query": {"text": "Capital of Chad?"}, "passage": "Chad's capital is N'Djamena.",
             "gold": [{"text": "N'Djamena"}]}]
    path = jsonl(tmp_path / "nested.jsonl", rows)
    task = with_shots(load_data(path, "qa-jsonl", fields="question=query.text,context=passage,answers=gold.text,"
                                                          "id=uid"), 0)
    assert [example.id for example in task.examples] == ["u1", "u2"]
    assert task.examples[0].fields == {"question": "Capital of Peru?", "context": "Peru's capital is Lima."}
    assert task.examples[0].golds == ("Lima", "Lima, Peru")
    assert task.template == READING_TEMPLATE
    closed = load_data(path, "qa-jsonl", fields={"question": "query.text", "answers": "gold.text"})
    assert closed.template == FACTOID_TEMPLATE  # no "context" field in the data: closed-book


def test_qa_jsonl_uses_a_context_field_when_the_data_has_one(tmp_path):
    rows = [{"question": f"q{i}?", "context": f"c{i}.", "answers": f"a{i}"} for i in range(3)]
    path = jsonl(tmp_path / "qa.jsonl", rows)
    assert load_data(path, "qa-jsonl").template == READING_TEMPLATE
    assert load_data(path, "qa-jsonl", fields="context=").template == FACTOID_TEMPLATE


def test_summarization_with_other_field_names(tmp_path):
    path = jsonl(tmp_path / "news.jsonl", [{"key": "n1", "body": DOCUMENT, "tldr": "Wall rebuilt."}])
    task = load_data(path, "summarization-jsonl", fields="document=body,summary=tldr,id=key")
    assert task.examples[0].id == "n1" and task.examples[0].golds == ("Wall rebuilt.",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("question=q,colour=c",
         r"--fields: unknown role 'colour' for qa-jsonl \(roles: question, context, answers, id\)"),
        ("question", r"'question' is not ROLE=FIELD"),
        ("question=q,question=r", r"role 'question' is given twice"),
        ("answers=", r"role 'answers' needs a field name"),
    ],
)
def test_bad_fields_are_one_line(tmp_path, fields, message):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answers": "x"}])
    with pytest.raises(DataError, match=message) as error:
        load_data(path, "qa-jsonl", fields=fields)
    assert "\n" not in str(error.value)


def test_formats_are_checked(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answers": "x"}])
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_data(path, "csv")
    with pytest.raises(DataError, match=r"qa\.jsonl: say which format"):
        load_data(path)
    squad = write(tmp_path / "dev.json", json.dumps(SQUAD))
    assert load_data(squad).template == READING_TEMPLATE  # .json is SQuAD
    with pytest.raises(DataError, match="--fields does not apply to SQuAD"):
        load_data(squad, "squad", fields="question=q")
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read the file"):
        load_data(tmp_path / "missing.jsonl", "qa-jsonl")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_answers_are_refused_not_read_as_text(tmp_path, constant):
    lines = ['{"question": "a?", "answers": "x"}', f'{{"question": "b?", "answers": [{constant}]}}']
    path = jsonl(tmp_path / "qa.jsonl", lines)
    with pytest.raises(DataError, match=r'qa\.jsonl:2: field "answers" must be a string .*NaN or Infinity'):
        load_data(path, "qa-jsonl")
    squad = json.dumps(SQUAD).replace('"text": "goats"', f'"text": {constant}')
    with pytest.raises(DataError, match=r'paragraphs\[1\]\.qas\[0\]: field "answers.text" .*NaN or Infinity'):
        load_squad(write(tmp_path / "dev.json", squad))


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("utf-16", r"nonascii\.jsonl: the file is UTF-16"),
        ("utf-16-le", r"nonascii\.jsonl:2: not UTF-8 .*zero bytes, as UTF-16"),
        ("latin-1", r"nonascii\.jsonl:2: not UTF-8 \(byte 0xf9; it looks like Latin-1"),
    ],
)
def test_files_not_in_utf8_are_named_with_their_encoding_problem(tmp_path, encoding, message):
    text = '{"question": "a?", "answers": "x"}\n{"question": "Où est le café?", "answers": "là"}\n'
    path = tmp_path / "nonascii.jsonl"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=message) as error:
        load_data(path, "qa-jsonl")
    assert "\n" not in str(error.value)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark is fine
    assert with_shots(load_data(path, "qa-jsonl"), 0).examples[1].golds == ("là",)


def test_load_hf_with_formats_and_fields(monkeypatch):
    tables = {("squad", None, "validation"): [{"id": "s1", "context": "Ada kept goats.", "question": "What?",
                                               "answers": {"text": ["goats"], "answer_start": [9]}}],
              ("trivia", "rc", "train"): [{"q": "Capital of Peru?", "a": {"aliases": ["Lima"]}}]}
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: tables[name, config, split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    squad = load_hf("squad")
    assert squad.name == "squad[validation]" and squad.examples[0].golds == ("goats",)
    trivia = load_hf("trivia:rc", "qa-jsonl", split="train", fields="question=q,answers=a.aliases")
    assert trivia.name == "trivia:rc[train]" and trivia.template == FACTOID_TEMPLATE
    assert trivia.examples[0].golds == ("Lima",)
    with pytest.raises(DataError, match=r"nope: cannot load split 'validation' \(KeyError"):
        load_hf("nope")
