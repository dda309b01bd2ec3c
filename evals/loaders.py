"""Loaders that turn data users bring into `Task` records.

Three formats, each with named roles that a field of the data fills:

    format                 roles (default field)                              task
    squad                  SQuAD JSON: data -> paragraphs -> context, qas     reading comprehension
    qa-jsonl               question, context, answers, id                     reading QA with a context,
                                                                              closed-book QA without
    summarization-jsonl    document, summary, id                              summarization (ROUGE)

`load_data(path, format, fields="question=q,answers=gold.text", name=...)` is what the command line
calls. A field may be a dotted path into nested objects: `answers.text` reads {"answers": {"text":
[...]}} and also {"answers": [{"text": ...}, ...]}. Without an `id` field, examples are named after
the line ("data-12"). In qa-jsonl the `context` role is used when the first line has a "context"
field (or when --fields names one); `context=` (empty) asks for closed-book QA.

The functions behind it can be called directly: `load_squad`, `load_jsonl_qa`,
`load_jsonl_summarization` (and `load_xsum`, `load_cnn_dailymail`, which know those datasets' field
names), and `load_hf` / `load_hf_qa` / `load_hf_summarization` for a Hugging Face dataset, when the
optional `datasets` package is installed (`pip install minillm[hf]`).

Task names: a task's name is the record key that keeps its results apart from every other task's,
so it never comes from a bare file stem (two files called data.jsonl must stay two tasks). Unless
`name` is given it is the stem and a short hash of the file's resolved path: "data-3f9c2a1e".

Tasks built here use the same prompts, demonstrations and metrics as the built-in tasks of the same
kind (`evals.tasks.make_reading_task` and friends), so their curves are comparable.

Malformed input raises `DataError` with one line that starts with where the problem is and names the
field: `data.jsonl:7: invalid JSON (...)`, `data.jsonl:3: missing field "summary"`. For SQuAD JSON,
which is one document, the place is a JSON path (`data[0].paragraphs[2].qas[1]`). Files must be
UTF-8 (a UTF-16 or Latin-1 file is named as such), and NaN or Infinity, which JSON does not allow but
Python's reader accepts, are refused rather than read as "nan".

Questions without any answer (SQuAD 2.0's unanswerable ones) are skipped: every metric needs a gold.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from evals.tasks import (
    Example,
    Task,
    evenly_spaced,
    make_factoid_task,
    make_reading_task,
    make_summarization_task,
)

USER_DATA_LICENCE = "the licence of the user's data"
QA_ROLES = ("question", "context", "answers", "id")
SUMMARIZATION_ROLES = ("document", "summary", "id")
FORMATS = {"squad": QA_ROLES, "qa-jsonl": QA_ROLES, "summarization-jsonl": SUMMARIZATION_ROLES}
# The fields of SQuAD-shaped rows (a SQuAD file's questions, the Hugging Face "squad" datasets).
SQUAD_FIELDS = {"question": "question", "context": "context", "answers": "answers.text", "id": "id"}


class DataError(ValueError):
    """Input data that cannot be read as a task; the message names the file, the place in it and the field."""


# --- reading files ---------------------------------------------------------------------------

class _NotFinite:
    """What NaN, Infinity or an overflowing number in a JSON file is read as, so that using it is an error."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def _parse_json(text: str):
    return json.loads(text, parse_constant=_NotFinite, parse_float=_parse_float)


def read_text(path: Path) -> str:
    """A data file's text: UTF-8 (with or without a byte-order mark), else a DataError naming the encoding problem."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        if b"\x00" in data:
            guess = "it holds zero bytes, as UTF-16 text does"
        else:
            guess = "it looks like Latin-1 or another 8-bit encoding"
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}; {guess}); "
                        "save the file as UTF-8") from None


def _path_hash(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:8]


def default_task_name(path: str | Path) -> str:
    """The name of a task read from `path` when none is given: the stem and a hash of the resolved path."""
    path = Path(path)
    return f"{path.stem}-{_path_hash(path)}"


# --- field access shared by every loader -----------------------------------------------------

def _lookup(row: dict, field: str, where: str) -> object:
    """The value at a dotted field path; a list of objects on the way gives the list of their values."""
    value: object = row
    walked: list[str] = []
    for part in field.split("."):
        if isinstance(value, list) and walked:
            for index, item in enumerate(value):
                if not isinstance(item, dict) or part not in item:
                    raise DataError(f'{where}: field "{field}": {".".join(walked)}[{index}] is not an object '
                                    f'with field "{part}"')
            value = [item[part] for item in value]
        elif isinstance(value, dict):
            if part not in value:
                raise DataError(f'{where}: missing field "{field}"')
            value = value[part]
        else:
            raise DataError(f'{where}: field "{".".join(walked)}" is {_kind(value)}, so it has no field "{part}"')
        walked.append(part)
    return value


def _kind(value: object) -> str:
    return "NaN or Infinity" if isinstance(value, _NotFinite) else f"a {type(value).__name__}"


def _as_text(value: object) -> str | None:
    """A string or a number as text; None for anything else (lists, objects, booleans, NaN)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _text_field(row: dict, field: str, where: str) -> str:
    value = _lookup(row, field, where)
    text = _as_text(value)
    if text is None:
        raise DataError(f'{where}: field "{field}" must be a string, not {_kind(value)}')
    return text


def _answers_field(row: dict, field: str, where: str) -> tuple[str, ...]:
    """Answers given as a string, a number, a list of them, or Hugging Face's SQuAD form {"text": [...]}."""
    value = _lookup(row, field, where)
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    values = value if isinstance(value, list) else [value]
    answers = [_as_text(answer) for answer in values]
    if any(answer is None for answer in answers):
        bad = next(answer for answer, text in zip(values, answers, strict=True) if text is None)
        raise DataError(f'{where}: field "{field}" must be a string or a list of strings, not holding {_kind(bad)}')
    return tuple(dict.fromkeys(answer.strip() for answer in answers if answer.strip()))  # unique, in order


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
        golds = _answers_field(row, answers, where)
        fields = {"question": _text_field(row, question, where)}
        if context is not None:
            fields["context"] = _text_field(row, context, where)
        example_id = _text_field(row, id_field, where) if id_field is not None else default_id
        _check_unique(example_id, seen, where)
        if golds:
            examples.append(Example(example_id, fields, golds))
    if not examples:
        raise DataError(f"{source}: no answerable questions")
    if context is not None:
        task = make_reading_task(name, examples, f"Reading comprehension from {source}.",
                                 source=source, licence=USER_DATA_LICENCE)
    else:
        task = make_factoid_task(name, examples, f"Closed-book QA from {source}.",
                                 source=source, licence=USER_DATA_LICENCE)
    return evenly_spaced(task, limit)


def _summarization_task(rows: Rows, *, name: str, source: str, document: str, summary: str,
                        id_field: str | None, limit: int | None) -> Task:
    examples: list[Example] = []
    seen: set[str] = set()
    for where, default_id, row in rows:
        fields = {"document": _text_field(row, document, where)}
        reference = _text_field(row, summary, where).strip()
        if not reference:
            raise DataError(f'{where}: field "{summary}" is empty')
        example_id = _text_field(row, id_field, where) if id_field is not None else default_id
        _check_unique(example_id, seen, where)
        examples.append(Example(example_id, fields, (reference,)))
    if not examples:
        raise DataError(f"{source}: no documents")
    task = make_summarization_task(name, examples, f"Summarization of documents from {source}.",
                                   source=source, licence=USER_DATA_LICENCE)
    return evenly_spaced(task, limit)


# --- JSONL -----------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    for line_number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = _parse_json(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(row).removeprefix('a ')}")
        yield where, f"{path.stem}-{line_number}", row


def load_jsonl_qa(path: str | Path, *, question: str = "question", answers: str = "answers",
                  context: str | None = None, id_field: str | None = None, name: str | None = None,
                  limit: int | None = None) -> Task:
    """A QA task from JSON lines; with `context`, a reading task whose passage is that field.

    `answers` may hold a string or a list of accepted strings. Without `id_field`, examples are named
    after the file and line ("mydata-12"). `limit` keeps that many examples, spread evenly.
    """
    path = Path(path)
    return _qa_task(_jsonl_rows(path), name=name or default_task_name(path), source=str(path), question=question,
                    answers=answers, context=context, id_field=id_field, limit=limit)


def load_jsonl_summarization(path: str | Path, *, document: str = "document", summary: str = "summary",
                             id_field: str | None = None, name: str | None = None, limit: int | None = None) -> Task:
    """A summarization task from JSON lines holding a document and its reference summary."""
    path = Path(path)
    return _summarization_task(_jsonl_rows(path), name=name or default_task_name(path), source=str(path),
                               document=document, summary=summary, id_field=id_field, limit=limit)


def load_xsum(path: str | Path, *, name: str | None = None, limit: int | None = None) -> Task:
    """XSum exported as JSON lines: fields "document", "summary" and "id"."""
    return load_jsonl_summarization(path, document="document", summary="summary", id_field="id",
                                    name=name, limit=limit)


def load_cnn_dailymail(path: str | Path, *, name: str | None = None, limit: int | None = None) -> Task:
    """CNN/DailyMail exported as JSON lines: fields "article", "highlights" (one per line) and "id"."""
    return load_jsonl_summarization(path, document="article", summary="highlights", id_field="id",
                                    name=name, limit=limit)


# --- SQuAD JSON ------------------------------------------------------------------------------

def _squad_list(node: object, field: str, where: str) -> list:
    if not isinstance(node, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(node).removeprefix('a ')}")
    if field not in node:
        raise DataError(f'{where}: missing field "{field}"')
    if not isinstance(node[field], list):
        raise DataError(f'{where}: field "{field}" must be a list')
    return node[field]


def _squad_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    try:
        document = _parse_json(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    for article_index, article in enumerate(_squad_list(document, "data", f"{path}")):
        article_where = f"{path}: data[{article_index}]"
        for paragraph_index, paragraph in enumerate(_squad_list(article, "paragraphs", article_where)):
            paragraph_where = f"{article_where}.paragraphs[{paragraph_index}]"
            context = _text_field(paragraph, "context", paragraph_where)
            for qa_index, qa in enumerate(_squad_list(paragraph, "qas", paragraph_where)):
                where = f"{paragraph_where}.qas[{qa_index}]"
                # Unanswerable SQuAD 2.0 questions have an empty list here (their guesses are in "plausible_answers").
                _squad_list(qa, "answers", where)
                yield where, "", {**qa, "context": context}


def load_squad(path: str | Path, *, name: str | None = None, limit: int | None = None) -> Task:
    """A reading-comprehension task from a SQuAD-format JSON file (v1.1 or v2.0).

    Each question becomes an example whose passage is its paragraph's context and whose golds are
    its answers' texts (duplicates merged). Unanswerable v2.0 questions are skipped.
    """
    path = Path(path)
    return _qa_task(_squad_rows(path), name=name or default_task_name(path), source=str(path),
                    question="question", answers="answers.text", context="context", id_field="id", limit=limit)


# --- Hugging Face datasets -------------------------------------------------------------------

def _hf_rows(dataset: str, config: str | None, split: str) -> Iterator[tuple[str, str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset}: loading a Hugging Face dataset needs the optional package 'datasets' "
                        "(pip install 'minillm[hf]', or pip install datasets); JSONL exports work without it") from None
    try:
        rows = datasets.load_dataset(dataset, config, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown name or config, bad split: each its own class
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"{dataset}: cannot load split {split!r} ({type(error).__name__}: {first_line})") from None
    for index, row in enumerate(rows):
        yield f"{dataset}[{split}] row {index}", f"{dataset}-{split}-{index}", dict(row)


def _hf_name(dataset: str, config: str | None, split: str) -> str:
    return f"{dataset}{'' if config is None else ':' + config}[{split}]"


def load_hf_qa(dataset: str, *, config: str | None = None, split: str = "validation",
               question: str = "question", answers: str = "answers", context: str | None = "context",
               id_field: str | None = "id", name: str | None = None, limit: int | None = None) -> Task:
    """A QA task from a Hugging Face dataset; the defaults fit SQuAD ("squad", "squad_v2")."""
    return _qa_task(_hf_rows(dataset, config, split), name=name or _hf_name(dataset, config, split),
                    source=f"{dataset} [{split}]", question=question, answers=answers, context=context,
                    id_field=id_field, limit=limit)


def load_hf_summarization(dataset: str, *, config: str | None = None, split: str = "validation",
                          document: str = "document", summary: str = "summary", id_field: str | None = "id",
                          name: str | None = None, limit: int | None = None) -> Task:
    """A summarization task from a Hugging Face dataset; the defaults fit XSum.

    For CNN/DailyMail: `load_hf_summarization("cnn_dailymail", config="3.0.0", document="article",
    summary="highlights")`.
    """
    return _summarization_task(_hf_rows(dataset, config, split), name=name or _hf_name(dataset, config, split),
                               source=f"{dataset} [{split}]", document=document, summary=summary, id_field=id_field,
                               limit=limit)


# --- one entry point for the command line ----------------------------------------------------

def parse_fields(spec: str | dict | None, format: str) -> dict[str, str | None]:
    """The role -> field mapping of `spec` ("ROLE=FIELD,..." or a dict) for `format`.

    An empty FIELD (`context=`) leaves an optional role out; unknown roles and formats are errors.
    """
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; formats: {', '.join(FORMATS)}")
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs = []
        for item in (item.strip() for item in spec.split(",") if item.strip()):
            role, equals, field = item.partition("=")
            if not equals:
                raise DataError(f"--fields {spec!r}: {item!r} is not ROLE=FIELD (e.g. question=q,answers=gold.text)")
            pairs.append((role.strip(), field.strip()))
        roles = [role for role, _ in pairs]
        twice = next((role for role in roles if roles.count(role) > 1), None)
        if twice is not None:
            raise DataError(f"--fields {spec!r}: role {twice!r} is given twice")
        spec = dict(pairs)
    for role, field in spec.items():
        if role not in FORMATS[format]:
            raise DataError(f"--fields: unknown role {role!r} for {format} (roles: {', '.join(FORMATS[format])})")
        if not field and role not in ("context", "id"):
            raise DataError(f"--fields: role {role!r} needs a field name")
    return {role: field or None for role, field in spec.items()}


def _first_row(path: Path) -> dict:
    return next(iter(_jsonl_rows(path)), ("", "", {}))[2]


def load_data(path: str | Path, format: str | None = None, *, fields: str | dict | None = None,
              name: str | None = None, limit: int | None = None) -> Task:
    """A task from a user's file: `format` is squad, qa-jsonl or summarization-jsonl (default: squad
    for .json files), `fields` maps roles to fields ("question=q,answers=gold.text")."""
    path = Path(path)
    if format is None:
        if path.suffix != ".json":
            raise DataError(f"{path}: say which format it is (--format {' | '.join(FORMATS)})")
        format = "squad"
    roles = parse_fields(fields, format)
    if format == "squad":
        if roles:
            raise DataError(f"{path}: --fields does not apply to SQuAD files, whose field names are fixed; "
                            "for other names, write JSON lines and use --format qa-jsonl")
        return load_squad(path, name=name, limit=limit)
    if format == "summarization-jsonl":
        return load_jsonl_summarization(path, document=roles.get("document", "document"),
                                        summary=roles.get("summary", "summary"), id_field=roles.get("id"),
                                        name=name, limit=limit)
    if "context" in roles:
        context = roles["context"]
    else:  # a reading task when the data has passages under the default name
        context = "context" if "context" in _first_row(path) else None
    return load_jsonl_qa(path, question=roles.get("question", "question"), answers=roles.get("answers", "answers"),
                         context=context, id_field=roles.get("id"), name=name, limit=limit)


def load_hf(dataset: str, format: str = "squad", *, split: str = "validation", fields: str | dict | None = None,
            name: str | None = None, limit: int | None = None) -> Task:
    """A task from a Hugging Face dataset "NAME" or "NAME:CONFIG".

    format squad: SQuAD's fields (question, context, answers.text, id); qa-jsonl: a QA dataset with
    other field names; summarization-jsonl: documents and summaries (XSum's fields by default).
    """
    dataset, _, config = dataset.partition(":")
    roles = parse_fields(fields, format)
    if format == "summarization-jsonl":
        return load_hf_summarization(dataset, config=config or None, split=split,
                                     document=roles.get("document", "document"),
                                     summary=roles.get("summary", "summary"), id_field=roles.get("id", "id"),
                                     name=name, limit=limit)
    defaults = SQUAD_FIELDS if format == "squad" else {"question": "question", "answers": "answers"}
    roles = defaults | roles
    return load_hf_qa(dataset, config=config or None, split=split, question=roles["question"],
                      answers=roles["answers"], context=roles.get("context"), id_field=roles.get("id"),
                      name=name, limit=limit)
