"""Evaluation tasks as small declarative records, and the built-in tasks.

A `Task` says everything a sweep needs to evaluate a model without knowing what the task is about:
how to write the prompt (a `str.format` template filled from an example's fields, preceded by
demonstrations, optionally wrapped in the model's chat template), when to stop generating, how to
clean and score the answer, and what score a model that ignores the question would get (the chance
level).

Built-in tasks, all available offline:

- `capitals`: closed-book QA, "What is the capital of X?", three-shot in the paper's Q/A format.
- `fanoutqa`: single-hop factoid questions from the FanOutQA dev set (fetched from its PyPI wheel).
- `context-qa`: reading comprehension over generated passages about invented people, towns,
  companies and ships, so the answer can only come from the passage (`evals.context_qa`).
- `summarization`: short original news articles with reference summaries.

`get_task(name, limit=None)` builds one by name; `TASKS` lists the names; `describe_tasks()` gives
a row per task (examples, metric, chance level). A task's prompts are changed with `with_shots`
(demonstrations drawn from its own data), `with_template`, `evenly_spaced` (the one meaning of
"limit": N examples spread evenly over the task), or all at once with `with_options`. Loaders for
data that users bring (SQuAD, JSONL, Hugging Face datasets) are in `evals.loaders` and build the same
records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from evals.context_qa import CONTEXT_QA_SEED, CONTEXT_QA_SIZE, generate_items
from evals.metrics import METRICS, normalize_answer
from minillm.tokenizer import ChatTemplate

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Example:
    """One item of a task: the fields its prompt template needs and every accepted answer.

    `golds[0]` is the canonical answer (used in demonstrations and for the chance level); the rest
    are aliases and other accepted forms ("Kiev" for "Kyiv").
    """

    id: str
    fields: dict[str, str]
    golds: tuple[str, ...]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The answer in a raw generation: leading whitespace dropped, cut at the earliest stop string, stripped.

    Leading whitespace goes first because models often open an answer with a space or a line break,
    which is not the end of the answer even when "\\n" is a stop string. Idempotent.
    """
    text = text.lstrip()
    cut = min((position for position in (text.find(s) for s in stop if s) if position >= 0), default=len(text))
    return text[:cut].strip()


@dataclass(frozen=True)
class Task:
    """A declarative evaluation task.

    The prompt for an example is the demonstrations (`shots`, each written as its filled template,
    a space and its first gold answer, joined by `shot_separator`), then `shot_separator`, then the
    example's filled template. Templates end where the answer begins (e.g. with "A:").

    With `chat`, the prompt is instead the model's chat template rendered over a conversation: each
    demonstration a user turn (its filled template) and an assistant turn (its answer), then the
    example's filled template as the last user turn, and the assistant's turn opened.

    `shot_seed` says where the demonstrations come from: None for fixed, hand-written ones; a seed
    for ones drawn from the task's own data (`with_shots`), which are then never scored.

    `metric` names an entry of `evals.metrics.METRICS`; `primary` is the key of its result that
    curves and reports use (e.g. "f1", "exact_match", "rougeL"). `source`, `licence` and `credit`
    say where the examples come from and whom to thank.
    """

    name: str
    description: str
    template: str
    examples: tuple[Example, ...]
    metric: str
    primary: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    shots: tuple[Example, ...] = ()
    shot_separator: str = "\n\n"
    shot_seed: int | None = None
    chat: ChatTemplate | None = None
    source: str = ""
    licence: str = ""
    credit: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r} (known: {', '.join(METRICS)})")
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for example in (*self.shots, *self.examples):
            if not example.golds or not all(isinstance(gold, str) and gold.strip() for gold in example.golds):
                raise ValueError(f"task {self.name!r}: example {example.id!r} needs non-empty gold answers")
            try:
                self.template.format(**example.fields)
            except KeyError as missing:
                raise ValueError(f"task {self.name!r}: example {example.id!r} has no field {missing} "
                                 f"that the template needs") from None
        keys = METRICS[self.metric](self.examples[0].golds[0], self.examples[0].golds)
        if self.primary not in keys:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} gives {sorted(keys)}, "
                             f"not the primary key {self.primary!r}")

    @property
    def prefix(self) -> str:
        """The demonstrations, written out, exactly as they open every plain prompt ('' without shots)."""
        if not self.shots:
            return ""
        written = [f"{self.template.format(**shot.fields)} {shot.golds[0]}" for shot in self.shots]
        return self.shot_separator.join(written) + self.shot_separator

    def prompt(self, example: Example) -> str:
        """The full prompt text for `example`: demonstrations, then the example's question."""
        if self.chat is None:
            return self.prefix + self.template.format(**example.fields)
        conversation = []
        for shot in self.shots:
            conversation += [{"role": "user", "content": self.template.format(**shot.fields)},
                             {"role": "assistant", "content": shot.golds[0]}]
        conversation.append({"role": "user", "content": self.template.format(**example.fields)})
        return self.chat.render(conversation, add_generation_prompt=True)

    def postprocess(self, generation: str) -> str:
        """The answer part of a raw generation (see `truncate_at_stop`)."""
        return truncate_at_stop(generation, self.stop)

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Scores of a generation for `example`; the generation is postprocessed first (idempotent)."""
        return METRICS[self.metric](self.postprocess(prediction), example.golds)

    @cached_property
    def chance(self) -> float:
        """Chance level of the primary score; see `chance_level`."""
        return chance_level(self.examples, self.metric, self.primary)

    def settings(self) -> dict:
        """Everything that decides this task's prompts and scores, JSON-ready (for a run's manifest).

        Two runs whose settings differ must not be mixed: the hashes change when any example, gold
        answer or rendered prompt does.
        """
        examples = [[example.id, example.fields, list(example.golds)] for example in self.examples]
        return {
            "name": self.name,
            "template": self.template,
            "shots": [shot.id for shot in self.shots],
            "shot_seed": self.shot_seed,
            "shot_separator": self.shot_separator,
            "chat_template_sha256": None if self.chat is None else _sha256(json.dumps(dataclasses.asdict(self.chat))),
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "metric": self.metric,
            "primary": self.primary,
            "examples": len(self.examples),
            "examples_sha256": _sha256(json.dumps(examples, sort_keys=True, ensure_ascii=False)),
            "prompts_sha256": _sha256("\0".join(self.prompt(example) for example in self.examples)),
        }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chance_level(examples: Sequence[Example], metric: str, primary: str, seed: int = 0) -> float:
    """Mean primary score when every example is answered with the canonical gold of another example.

    For each example a different example of the same task is drawn with a seeded RNG, and its
    first gold answer is scored as the prediction. This is what a model earns by producing an
    answer of the right kind that ignores the question: about 0 for the QA tasks, and a real floor
    for ROUGE, where unrelated summaries still share words. (A model that reads the passage but picks
    the wrong entity does better on context-qa; its `distractors` field lets a sweep measure that.)
    NaN for fewer than two examples, where there is no other example.
    """
    if len(examples) < 2:
        return float("nan")
    rng = random.Random(seed)
    score = METRICS[metric]
    total = 0.0
    for index, example in enumerate(examples):
        other = rng.randrange(len(examples) - 1)
        other += other >= index  # skip the example itself
        total += score(examples[other].golds[0], example.golds)[primary]
    return total / len(examples)


# --- changing a task's examples and prompts ----------------------------------------------------

def evenly_spaced(task: Task, count: int | None) -> Task:
    """The task with `count` of its examples, spread evenly over it (all of them for None).

    This is what "limit" means everywhere. Neighbouring examples often share a source (fanoutqa
    lists the sub-questions of one question together), so a spread sample is more representative
    than the first `count`.
    """
    if count is None or count >= len(task.examples):
        return task
    if count < 1:
        raise ValueError(f"limit must be at least 1 example, got {count}")
    step = len(task.examples) / count
    return dataclasses.replace(task, examples=tuple(task.examples[int(i * step)] for i in range(count)))


def with_shots(task: Task, count: int, seed: int = 0) -> Task:
    """The task with `count` demonstrations drawn from its own data, which are then not scored.

    The draw is a seeded sample (same data and seed, same demonstrations), kept in data order. It
    replaces the task's demonstrations: hand-written ones are dropped, and ones drawn before go
    back into the pool (after the examples) first, so `with_shots(task, 0)` scores all the data.
    """
    pool = task.examples + (task.shots if task.shot_seed is not None else ())
    if count < 0:
        raise ValueError(f"shots must be 0 or more, got {count}")
    if count >= len(pool):
        raise ValueError(f"task {task.name!r}: {count} shots would leave no example to score "
                         f"(it has {len(pool)} examples)")
    drawn = set(random.Random(seed).sample(range(len(pool)), count))
    return dataclasses.replace(
        task, shots=tuple(example for index, example in enumerate(pool) if index in drawn),
        examples=tuple(example for index, example in enumerate(pool) if index not in drawn),
        shot_seed=seed if count else None)


def template_fields(template: str) -> list[str]:
    """The names of the fields a `str.format` template fills, in order; a ValueError for anything else.

    Only plain names are allowed: "{question}", not "{0}", "{}" or "{question.upper}".
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template {template!r}: {error} (write a literal brace as {{{{ or }}}})") from None
    names = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"template {template!r}: field {{{field}}} must be a plain name such as {{question}}")
        names.append(field)
    return names


def with_template(task: Task, template: str) -> Task:
    """The task with its prompts written from `template` ("{question}", "{context}", "{document}"...).

    Refuses a field that some example lacks, naming the fields the task has.
    """
    names = template_fields(template)
    available = set.intersection(*(set(example.fields) for example in (*task.shots, *task.examples)))
    shown = ", ".join(f"{{{name}}}" for name in sorted(available))
    for name in names:
        if name not in available:
            raise ValueError(f"template {template!r}: unknown field {{{name}}} for task {task.name!r} "
                             f"(its fields: {shown})")
    if not names:
        raise ValueError(f"template {template!r} has no field, so every prompt would be the same "
                         f"(task {task.name!r} has {shown})")
    return dataclasses.replace(task, template=template)


def with_options(task: Task, *, template: str | None = None, shots: int | None = None, seed: int = 0,
                 max_new_tokens: int | None = None, limit: int | None = None, chat: ChatTemplate | None = None) -> Task:
    """The task with the prompt options a user chose; None keeps the task's own setting.

    In order: the template, `shots` demonstrations drawn with `seed` (a task that draws its own by
    default redraws them with `seed`), the answer budget, `limit` examples spread evenly over what is
    left to score, and the chat template that wraps each prompt.
    """
    if template is not None:
        task = with_template(task, template)
    if shots is not None:
        task = with_shots(task, shots, seed)
    elif task.shot_seed is not None and task.shot_seed != seed:
        task = with_shots(task, len(task.shots), seed)
    if max_new_tokens is not None:
        task = dataclasses.replace(task, max_new_tokens=max_new_tokens)
    task = evenly_spaced(task, limit)
    if chat is not None:
        task = dataclasses.replace(task, chat=chat)
    return task


# --- Builders shared by the built-in tasks and the loaders -------------------------------------

FACTOID_TEMPLATE = "Q: {question}\nA:"
FACTOID_SHOTS = (
    Example("factoid-shot-1", {"question": "Who wrote the novel Pride and Prejudice?"}, ("Jane Austen",)),
    Example("factoid-shot-2", {"question": "In what year did the Berlin Wall fall?"}, ("1989",)),
)

READING_TEMPLATE = "Passage: {context}\nQuestion: {question}\nAnswer:"
# Reading tasks draw their demonstrations from their own data (seed 0), so the answers shown are of
# the kinds the task asks for, not one fixed kind: a single hand-written "In what year..." shot made
# small models answer every question with a year.
READING_SHOTS = 2

SUMMARY_TEMPLATE = "Article: {document}\nSummary:"
SUMMARY_SHOT = Example(
    "summary-shot",
    {
        "document": "The village shop in Lower Hadley will stay open after residents raised 60,000 "
                    "pounds to buy it from its retiring owners. More than 200 households bought shares, "
                    "and volunteers will help the two paid staff run the shop, which also houses the "
                    "post office. It reopens under community ownership next Monday.",
    },
    (("Residents of Lower Hadley raised 60,000 pounds to buy their village shop and post office, "
      "which reopens under community ownership on Monday."),),
)


def make_factoid_task(name: str, examples: Sequence[Example], description: str, *,
                      source: str = "", licence: str = "", credit: str = "") -> Task:
    """Closed-book short-answer QA: two fixed demonstrations, then "Q: {question}\\nA:"."""
    return Task(name=name, description=description, template=FACTOID_TEMPLATE, examples=tuple(examples),
                metric="squad", primary="f1", max_new_tokens=16, stop=("\n",), shots=FACTOID_SHOTS,
                shot_separator="\n", source=source, licence=licence, credit=credit)


def make_reading_task(name: str, examples: Sequence[Example], description: str, *,
                      source: str = "", licence: str = "", credit: str = "") -> Task:
    """Reading comprehension: "Passage: ...\\nQuestion: ...\\nAnswer:" after two demonstrations drawn
    from the same data (seed 0; fewer when there are not enough examples to leave one to score)."""
    task = Task(name=name, description=description, template=READING_TEMPLATE, examples=tuple(examples),
                metric="squad", primary="exact_match", max_new_tokens=16, stop=("\n",),
                shot_separator="\n\n", source=source, licence=licence, credit=credit)
    return with_shots(task, min(READING_SHOTS, len(examples) - 1), seed=0)


def make_summarization_task(name: str, examples: Sequence[Example], description: str, *,
                            source: str = "", licence: str = "", credit: str = "",
                            max_new_tokens: int = 100) -> Task:
    """Summarization: one short demonstration, then "Article: ...\\nSummary:", scored with ROUGE-L."""
    return Task(name=name, description=description, template=SUMMARY_TEMPLATE, examples=tuple(examples),
                metric="rouge", primary="rougeL", max_new_tokens=max_new_tokens, stop=("\n\n", "Article:"),
                shots=(SUMMARY_SHOT,), shot_separator="\n\n", source=source, licence=licence, credit=credit)


# --- capitals --------------------------------------------------------------------------------

# Three demonstrations: the paper used one, but SmolLM2-135M answers barely 10% of the items after a
# single shot (it tends to repeat the country) and about half after three.
CAPITALS_SHOTS = tuple(Example(f"capitals-shot-{country.lower()}", {"country": country}, (capital,))
                       for country, capital in (("Spain", "Madrid"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def capitals() -> Task:
    """Closed-book QA in the paper's question-answer form, three-shot:

        Q: What is the capital of Spain?
        A: Madrid

        (Japan, Kenya likewise)

        Q: What is the capital of France?
        A:

    The demonstration countries are not among the items. Countries whose capital shares a word
    with the country's name (Mexico City, Kuwait City, Tunis) are left out of the data: copying from
    the question would answer them, and the experiment is about what previous tokens carry.
    """
    shown = {shot.fields["country"] for shot in CAPITALS_SHOTS}
    rows = [row for row in json.loads((DATA_DIR / "capitals.json").read_text(encoding="utf-8"))
            if row["country"] not in shown]
    examples = tuple(
        Example(f"capitals-{_slug(row['country'])}", {"country": row["country"]}, (row["capital"], *row["aliases"]))
        for row in rows
    )
    return Task(
        name="capitals",
        description="Closed-book QA: the capital city of a country, three-shot, in the paper's Q/A format.",
        template="Q: What is the capital of {country}?\nA:",
        examples=examples,
        metric="squad",
        primary="exact_match",
        max_new_tokens=10,
        stop=("\n", "Q:"),
        shots=CAPITALS_SHOTS,
        shot_separator="\n\n",
        source="evals/data/capitals.json, compiled for minillm (capitals and common alternative names)",
        licence="Apache-2.0 (project data; the facts themselves are public knowledge)",
        credit="Prompt format after Ben-Artzy & Schwartz (2024), Attend First, Consolidate Later.",
    )


def swap_pairs(limit: int | None = None, seed: int = 0) -> list[tuple[Example, Example]]:
    """(recipient, donor) pairs of capitals examples for the swap experiment.

    The recipient's country tokens get the donor country's hidden states, and the generation is
    checked against both capitals. Every recipient appears once, in a seeded order; its donor is a
    different, seeded-random country whose accepted capitals share none with the recipient's.
    """
    examples = list(capitals().examples)
    rng = random.Random(seed)
    rng.shuffle(examples)
    accepted = {example.id: {normalize_answer(gold) for gold in example.golds} for example in examples}
    pairs = []
    for recipient in examples[:limit]:
        donors = [other for other in examples
                  if other.id != recipient.id and not accepted[other.id] & accepted[recipient.id]]
        pairs.append((recipient, rng.choice(donors)))
    return pairs


# --- fanoutqa --------------------------------------------------------------------------------

FANOUTQA_VERSION = "1.1.1"
FANOUTQA_MEMBER = "fanoutqa/data/fanout-final-dev.json"
FANOUTQA_CREDIT = ("FanOutQA: A Multi-Hop, Multi-Document Question Answering Benchmark for Large Language "
                   "Models. Andrew Zhu, Alyssa Hwang, Liam Dugan, Chris Callison-Burch. ACL 2024.")

_MAX_ANSWER_WORDS = 5
_MAX_ANSWER_CHARS = 40


def _short_answer(answer: object) -> str | None:
    """A factoid answer as text, or None for answers we do not keep (lists, booleans, long text)."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return None
    if isinstance(answer, float):
        text = str(int(answer)) if answer.is_integer() else str(answer)
    else:
        text = str(answer).strip()
    if not text or len(text.split()) > _MAX_ANSWER_WORDS or len(text) > _MAX_ANSWER_CHARS:
        return None
    # Enumerations ("ACU, ACC and ACG") and web addresses are not factoids a model can be scored on.
    if " and " in text or ";" in text or "://" in text or text.lower().startswith("www."):
        return None
    return text


def fanoutqa() -> Task:
    """Single-hop factoid questions from the decompositions of FanOutQA's dev questions.

    Each dev question comes with a tree of simpler sub-questions and their answers; we keep the
    sub-questions whose answer is a short string or number (lists, yes/no and long answers are
    dropped) and drop "How old ..." questions, whose answer changed with the date they were written.
    A question asked several times with differently written answers ("8,848.86 m", "8848.86") becomes
    one example accepting all of them. Order is the file's depth-first order.
    """
    from minillm.assets import wheel_member

    path = wheel_member("fanoutqa", FANOUTQA_VERSION, FANOUTQA_MEMBER)
    dev_questions = json.loads(path.read_text(encoding="utf-8"))

    by_question: dict[str, tuple[str, str, list[str]]] = {}  # normalised question -> (id, question, golds)

    def collect(steps: list[dict]) -> None:
        for step in steps:
            question = " ".join(step["question"].split())
            answer = _short_answer(step["answer"])
            if answer is not None and not question.lower().startswith("how old"):
                _, _, golds = by_question.setdefault(question.lower(), (step["id"], question, []))
                if answer not in golds:
                    golds.append(answer)
            collect(step["decomposition"])

    for dev_question in dev_questions:
        collect(dev_question["decomposition"])

    shot_questions = {shot.fields["question"].lower() for shot in FACTOID_SHOTS}
    examples = [Example(f"fanoutqa-{step_id}", {"question": question}, tuple(golds))
                for key, (step_id, question, golds) in by_question.items() if key not in shot_questions]
    return make_factoid_task(
        "fanoutqa", examples,
        "Closed-book single-hop factoid QA from the FanOutQA dev set's question decompositions.",
        source=f"FanOutQA dev set ({FANOUTQA_MEMBER} in the fanoutqa=={FANOUTQA_VERSION} wheel)",
        licence="CC BY-SA 4.0",
        credit=FANOUTQA_CREDIT,
    )


# --- summarization ---------------------------------------------------------------------------

def context_qa(size: int = CONTEXT_QA_SIZE, seed: int = CONTEXT_QA_SEED) -> Task:
    """Reading comprehension where the answer exists only in a passage of the prompt.

    Passages are generated from `seed` (same seed, same items) about invented people, companies,
    towns and ships, so no model knows the answers beforehand: they must travel by attention from
    the passage's tokens. Each item's `distractors` field lists the same-type values that the
    passage gives for the other entities (" | "-separated), for analysing wrong answers.
    """
    examples = [Example(id, fields, golds) for id, fields, golds in generate_items(size, seed)]
    return make_reading_task(
        "context-qa", examples,
        "Reading comprehension over generated passages about invented entities, with same-type distractors.",
        source=f"generated by evals.context_qa (seed {seed})",
        licence="Apache-2.0 (project code)",
        credit="minillm",
    )


def summarization() -> Task:
    """Short news-style articles written for minillm, each with a one-to-three-sentence summary."""
    examples = []
    with open(DATA_DIR / "summarization.jsonl", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            examples.append(Example(row["id"], {"document": row["document"]}, (row["summary"],)))
    return make_summarization_task(
        "summarization", examples,
        "Summarize an original 110-140 word news-style article in one to three sentences.",
        source="evals/data/summarization.jsonl, written for minillm (fictional places and people)",
        licence="Apache-2.0 (project data)",
        credit="minillm",
    )


# --- registry --------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], Task]] = {
    "capitals": capitals,
    "fanoutqa": fanoutqa,
    "context-qa": context_qa,
    "summarization": summarization,
}
TASKS: tuple[str, ...] = tuple(_BUILDERS)


def get_task(name: str, limit: int | None = None) -> Task:
    """The built-in task `name`, with `limit` of its examples spread evenly over it when given."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return evenly_spaced(_BUILDERS[name](), limit)


def describe_tasks() -> list[dict]:
    """One row per built-in task: name, scored examples, demonstrations, metric, chance level, description."""
    rows = []
    for name in TASKS:
        task = get_task(name)
        rows.append({"task": name, "examples": len(task.examples), "shots": len(task.shots),
                     "metric": task.primary, "chance": task.chance, "description": task.description})
    return rows
