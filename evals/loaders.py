"""Loaders that turn data users bring into `Task` records.

- `load_squad`: SQuAD-format JSON (data -> paragraphs -> qas -> answers) as a reading-comprehension task.
- `load_jsonl_qa`: one question per line, with or without a passage, as a reading or closed-book QA task.
- `load_jsonl_summarization`: one document per line, as a summarization task; `load_xsum` and
  `load_cnn_dailymail` name the fields of those two datasets (document/summary, article/highlights).
- `load_hf_qa`, `load_hf_summarization`: the same from a Hugging Face dataset, when the optional
  `datasets` package is installed and the dataset is reachable.

Tasks built here use the same prompts, demonstrations and metrics as the built-in tasks of the same
kind (`evals.tasks.make_reading_task` and friends), so their curves are comparable.

Malformed input raises `DataError` with a one-line message that starts with where the problem is:
`data.jsonl:7: invalid JSON (...)`, `data.jsonl:3: missing field "summary"`. For SQuAD JSON, which is
one document, structural problems are located by their JSON path (`data[0].paragraphs[2].qas[1]`).

Questions without any answer (SQuAD 2.0's unanswerable ones) are skipped: every metric needs a gold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from evals.tasks import Example, Task, make_factoid_task, make_reading_task, make_summarization_task

USER_DATA_LICENCE = "the licence of the user's data"


class DataError(ValueError):
    """Input data that cannot be read as a task; the message names the file and the place in it."""


# --- field access shared by every loader -----------------------------------------------------

def _text_field(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise DataError(f'{where}: missing field "{field}"')
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f'{where}: field "{field}" must be a string, not {type(value).__name__}')
    return str(value)


def _answers_field(row: dict, field: str, where: str) -> tuple[str, ...]:
    """Answers given as a string, a number, a list of them, or Hugging Face's SQuAD form {"text": [...]}."""
    if field not in row:
        raise DataError(f'{where}: missing field "{field}"')
    value = row[field]
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(
            isinstance(answer, (str, int, float)) and not isinstance(answer, bool) for answer in value):
        raise DataError(f'{where}: field "{field}" must be a string or a list of strings')
    answers = [str(answer).strip() for answer in value]
    return tuple(dict.fromkeys(answer for answer in answers if answer))  # unique, in order


def _check_unique(example_id: str, seen: set[str], where: str) -> None:
    # Sweeps record results by example id, so two examples with one id would overwrite each other.
    if example_id in seen:
        raise DataError(f"{where}: duplicate id {example_id!r}")
    seen.add(example_id)


# --- turning rows into tasks -----------------------------------------------------------------

Rows = Iterable[tuple[str, str, dict]]  # (where, default id, row)


def _qa_task(rows: Rows, *, name: str, source: str, question: str, answers: str, context: str | None,
             id_field: str | None, limit: int | None) -> Task:
    examples: list[Example] = []
    seen: set[str] = set()
    for where, default_id, row in rows:
        if limit is not None and len(examples) >= limit:
            break
        golds = _answers_field(row, answers, where)
        fields = {"question": _text_field(row, question, where)}
        if context is not None:
            fields["passage"] = _text_field(row, context, where)
        example_id = _text_field(row, id_field, where) if id_field is not None else default_id
        _check_unique(example_id, seen, where)
        if golds:
            examples.append(Example(example_id, fields, golds))
    if not examples:
        raise DataError(f"{source}: no answerable questions")
    if context is not None:
        return make_reading_task(name, examples, f"Reading comprehension from {source}.",
                                 source=source, licence=USER_DATA_LICENCE)
    return make_factoid_task(name, examples, f"Closed-book QA from {source}.",
                             source=source, licence=USER_DATA_LICENCE)


def _summarization_task(rows: Rows, *, name: str, source: str, document: str, summary: str,
                        id_field: str | None, limit: int | None) -> Task:
    examples: list[Example] = []
    seen: set[str] = set()
    for where, default_id, row in rows:
        if limit is not None and len(examples) >= limit:
            break
        fields = {"document": _text_field(row, document, where)}
        reference = _text_field(row, summary, where).strip()
        if not reference:
            raise DataError(f'{where}: field "{summary}" is empty')
        example_id = _text_field(row, id_field, where) if id_field is not None else default_id
        _check_unique(example_id, seen, where)
        examples.append(Example(example_id, fields, (reference,)))
    if not examples:
        raise DataError(f"{source}: no documents")
    return make_summarization_task(name, examples, f"Summarization of documents from {source}.",
                                   source=source, licence=USER_DATA_LICENCE)


# --- JSONL -----------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, f"{path.stem}-{line_number}", row


def load_jsonl_qa(path: str | Path, *, question: str = "question", answers: str = "answers",
                  context: str | None = None, id_field: str | None = None, name: str | None = None,
                  limit: int | None = None) -> Task:
    """A QA task from JSON lines; with `context`, a reading task whose passage is that field.

    `answers` may hold a string or a list of accepted strings. Without `id_field`, examples are named
    after the file and line ("mydata-12"). `limit` stops reading after that many examples.
    """
    path = Path(path)
    return _qa_task(_jsonl_rows(path), name=name or f"qa:{path.stem}", source=str(path), question=question,
                    answers=answers, context=context, id_field=id_field, limit=limit)


def load_jsonl_summarization(path: str | Path, *, document: str = "document", summary: str = "summary",
                             id_field: str | None = None, name: str | None = None, limit: int | None = None) -> Task:
    """A summarization task from JSON lines holding a document and its reference summary."""
    path = Path(path)
    return _summarization_task(_jsonl_rows(path), name=name or f"summarization:{path.stem}", source=str(path),
                               document=document, summary=summary, id_field=id_field, limit=limit)


def load_xsum(path: str | Path, *, name: str | None = None, limit: int | None = None) -> Task:
    """XSum exported as JSON lines: fields "document", "summary" and "id"."""
    return load_jsonl_summarization(path, document="document", summary="summary", id_field="id",
                                    name=name or f"xsum:{Path(path).stem}", limit=limit)


def load_cnn_dailymail(path: str | Path, *, name: str | None = None, limit: int | None = None) -> Task:
    """CNN/DailyMail exported as JSON lines: fields "article", "highlights" (one per line) and "id"."""
    return load_jsonl_summarization(path, document="article", summary="highlights", id_field="id",
                                    name=name or f"cnn_dailymail:{Path(path).stem}", limit=limit)


# --- SQuAD JSON ------------------------------------------------------------------------------

def _squad_list(node: object, field: str, where: str) -> list:
    if not isinstance(node, dict):
        raise DataError(f"{where}: expected a JSON object")
    if field not in node:
        raise DataError(f'{where}: missing field "{field}"')
    if not isinstance(node[field], list):
        raise DataError(f'{where}: field "{field}" must be a list')
    return node[field]


def _squad_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    for article_index, article in enumerate(_squad_list(document, "data", f"{path}")):
        article_where = f"{path}: data[{article_index}]"
        for paragraph_index, paragraph in enumerate(_squad_list(article, "paragraphs", article_where)):
            paragraph_where = f"{article_where}.paragraphs[{paragraph_index}]"
            context = _text_field(paragraph, "context", paragraph_where)
            for qa_index, qa in enumerate(_squad_list(paragraph, "qas", paragraph_where)):
                where = f"{paragraph_where}.qas[{qa_index}]"
                answers = _squad_list(qa, "answers", where)
                for answer_index, answer in enumerate(answers):
                    if not isinstance(answer, dict) or "text" not in answer:
                        raise DataError(f'{where}.answers[{answer_index}]: expected an object with field "text"')
                # Unanswerable SQuAD 2.0 questions have an empty list here (their guesses are in "plausible_answers").
                texts = [answer["text"] for answer in answers]
                row = {"context": context, "question": qa.get("question"), "id": qa.get("id"), "answers": texts}
                if row["question"] is None:
                    raise DataError(f'{where}: missing field "question"')
                if row["id"] is None:
                    raise DataError(f'{where}: missing field "id"')
                yield where, "", row


def load_squad(path: str | Path, *, name: str | None = None, limit: int | None = None) -> Task:
    """A reading-comprehension task from a SQuAD-format JSON file (v1.1 or v2.0).

    Each question becomes an example whose passage is its paragraph's context and whose golds are
    its answers' texts (duplicates merged). Unanswerable v2.0 questions are skipped.
    """
    path = Path(path)
    return _qa_task(_squad_rows(path), name=name or f"squad:{path.stem}", source=str(path), question="question",
                    answers="answers", context="context", id_field="id", limit=limit)


# --- Hugging Face datasets -------------------------------------------------------------------

def _hf_rows(dataset: str, config: str | None, split: str) -> Iterator[tuple[str, str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ImportError("loading a Hugging Face dataset needs the optional package 'datasets' "
                          "(pip install datasets); JSONL exports work without it") from None
    rows = datasets.load_dataset(dataset, config, split=split)
    for index, row in enumerate(rows):
        yield f"{dataset}[{split}] row {index}", f"{dataset}-{split}-{index}", dict(row)


def load_hf_qa(dataset: str, *, config: str | None = None, split: str = "validation",
               question: str = "question", answers: str = "answers", context: str | None = "context",
               id_field: str | None = "id", name: str | None = None, limit: int | None = None) -> Task:
    """A QA task from a Hugging Face dataset; the defaults fit SQuAD ("squad", "squad_v2")."""
    return _qa_task(_hf_rows(dataset, config, split), name=name or f"hf:{dataset}", source=f"{dataset} [{split}]",
                    question=question, answers=answers, context=context, id_field=id_field, limit=limit)


def load_hf_summarization(dataset: str, *, config: str | None = None, split: str = "validation",
                          document: str = "document", summary: str = "summary", id_field: str | None = "id",
                          name: str | None = None, limit: int | None = None) -> Task:
    """A summarization task from a Hugging Face dataset; the defaults fit XSum.

    For CNN/DailyMail: `load_hf_summarization("cnn_dailymail", config="3.0.0", document="article",
    summary="highlights")`.
    """
    return _summarization_task(_hf_rows(dataset, config, split), name=name or f"hf:{dataset}",
                               source=f"{dataset} [{split}]", document=document, summary=summary, id_field=id_field,
                               limit=limit)
