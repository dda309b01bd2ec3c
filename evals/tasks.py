"""Evaluation tasks as small declarative records, and the four built-in tasks.

A `Task` says everything a sweep needs to evaluate a model without knowing what the task is about:
how to write the prompt (a `str.format` template filled from an example's fields, preceded by fixed
demonstrations), when to stop generating, how to clean and score the answer, and what score a
model that ignores the question would get (the chance level).

Built-in tasks, all available offline:

- `capitals`: closed-book QA, "What is the capital of X?", three-shot in the paper's Q/A format.
- `fanoutqa`: single-hop factoid questions from the FanOutQA dev set (fetched from its PyPI wheel).
- `context-qa`: reading comprehension over generated passages about invented people, towns,
  companies and ships, so the answer can only come from the passage.
- `summarization`: short original news articles with reference summaries.

`get_task(name, limit=None)` builds one by name; `TASKS` lists the names. Loaders for data that
users bring (SQuAD, JSONL, Hugging Face datasets) are in `evals.loaders` and build the same records.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from evals.metrics import METRICS, normalize_answer

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
    source: str = ""
    licence: str = ""
    credit: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r} (known: {', '.join(METRICS)})")
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples")
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
        """The demonstrations, written out, exactly as they open every prompt ('' without shots)."""
        if not self.shots:
            return ""
        written = [f"{self.template.format(**shot.fields)} {shot.golds[0]}" for shot in self.shots]
        return self.shot_separator.join(written) + self.shot_separator

    def prompt(self, example: Example) -> str:
        """The full prompt for `example`: demonstrations, then the example's question."""
        return self.prefix + self.template.format(**example.fields)

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


# --- Builders shared by the built-in tasks and the loaders -------------------------------------

FACTOID_TEMPLATE = "Q: {question}\nA:"
FACTOID_SHOTS = (
    Example("factoid-shot-1", {"question": "Who wrote the novel Pride and Prejudice?"}, ("Jane Austen",)),
    Example("factoid-shot-2", {"question": "In what year did the Berlin Wall fall?"}, ("1989",)),
)

READING_TEMPLATE = "Passage: {passage}\nQuestion: {question}\nAnswer:"
READING_SHOT = Example(
    "reading-shot",
    {
        "passage": "Corvina Ashdale keeps the lighthouse at Eastbrook and was born in 1958. "
                   "Her neighbour Maribel Fontaine is a dentist. Maribel was born in 1971 and "
                   "collects old maps.",
        "question": "In what year was Maribel Fontaine born?",
    },
    ("1971",),
)

SUMMARY_TEMPLATE = "Article: {document}\nSummary:"
SUMMARY_SHOT = Example(
    "summary-shot",
    {
        "document": "The village shop in Lower Hadley will stay open after residents raised 60,000 "
                    "pounds to buy it from its retiring owners. More than 200 households bought shares, "
                    "and volunteers will help the two paid staff run the shop, which also houses the "
                    "post office. It reopens under community ownership next Monday.",
    },
    ("Residents of Lower Hadley raised 60,000 pounds to buy their village shop and post office, "
     "which reopens under community ownership on Monday.",),
)


def make_factoid_task(name: str, examples: Sequence[Example], description: str, *,
                      source: str = "", licence: str = "", credit: str = "") -> Task:
    """Closed-book short-answer QA: two fixed demonstrations, then "Q: {question}\\nA:"."""
    return Task(name=name, description=description, template=FACTOID_TEMPLATE, examples=tuple(examples),
                metric="squad", primary="f1", max_new_tokens=16, stop=("\n",), shots=FACTOID_SHOTS,
                shot_separator="\n", source=source, licence=licence, credit=credit)


def make_reading_task(name: str, examples: Sequence[Example], description: str, *,
                      source: str = "", licence: str = "", credit: str = "") -> Task:
    """Reading comprehension: one fixed demonstration, then "Passage: ...\\nQuestion: ...\\nAnswer:"."""
    return Task(name=name, description=description, template=READING_TEMPLATE, examples=tuple(examples),
                metric="squad", primary="exact_match", max_new_tokens=16, stop=("\n",), shots=(READING_SHOT,),
                shot_separator="\n\n", source=source, licence=licence, credit=credit)


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


# --- context-qa ------------------------------------------------------------------------------

CONTEXT_QA_SIZE = 250
CONTEXT_QA_SEED = 2409  # after the paper's arXiv number, 2409.03621

# Invented-name parts. Each kind of value has its own pool so that an answer never appears inside
# the question (a town name cannot hide inside a person's name).
_FIRST_START = ["Al", "Bri", "Cas", "Dor", "El", "Fen", "Gil", "Hes", "Ior", "Jas", "Kel", "Lun", "Mer",
                "Nes", "Or", "Pel", "Quor", "Ris", "Sab", "Tam", "Ul", "Ves", "Wen", "Yor", "Zan"]
_FIRST_END = ["ric", "wen", "dra", "mon", "ith", "ara", "olt", "essa", "ian", "ova"]
_SURNAME_START = ["Brag", "Cot", "Drum", "Fal", "Gor", "Hask", "Lind", "Morv", "Pask", "Rend", "Strav",
                  "Tull", "Varn", "Wex", "Yell", "Quen", "Obb", "Nack"]
_SURNAME_END = ["ley", "wick", "mond", "ersby", "holt", "grave", "man", "son", "ard", "ett"]
_TOWN_START = ["Ash", "Bel", "Crow", "Dun", "Elm", "Fox", "Glen", "Hart", "Ivy", "Kin", "Lark", "Moss",
               "Oak", "Pine", "Quill", "Rook", "Sal", "Thorn", "Wil", "Yew"]
_TOWN_END = ["ford", "mere", "by", "haven", "stead", "bury", "combe", "dale", "port", "holme"]
_COMPANY_START = ["Vel", "Cre", "Ast", "Bol", "Tyr", "Mira", "Quan", "Zeph", "Orr", "Luma"]
_COMPANY_END = ["tek", "vox", "dyne", "mark", "line", "gen", "tron", "via"]
_COMPANY_SUFFIX = ["Works", "Industries", "Labs", "Trading", "Brothers", "Group", "Supply", "Foundry"]
_SHIP_ADJECTIVE = ["Silent", "Northern", "Bright", "Swift", "Wandering", "Iron", "Patient", "Lucky",
                   "Gentle", "Restless"]
_SHIP_NOUN = ["Heron", "Lantern", "Tide", "Comet", "Otter", "Anchor", "Gull", "Thistle", "Marten", "Compass"]
_RIVERS = ["Lenn", "Arve", "Tarrow", "Skelt", "Omber", "Wend", "Carra", "Isk", "Doven", "Mirra", "Fell", "Saule"]

_PROFESSIONS = ["baker", "pilot", "surgeon", "librarian", "carpenter", "violinist", "geologist", "plumber",
                "journalist", "architect", "beekeeper", "chemist", "tailor", "firefighter", "lawyer",
                "gardener", "potter", "astronomer", "translator", "mechanic"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "teal", "crimson", "amber",
            "violet", "indigo", "maroon", "turquoise"]
_ANIMALS = ["cat", "parrot", "tortoise", "goat", "ferret", "rabbit", "horse", "dog", "hamster", "owl",
            "lizard", "donkey"]
_PRODUCTS = ["bicycles", "umbrellas", "telescopes", "violins", "garden tools", "board games", "ceramic tiles",
             "solar panels", "canoes", "wool blankets", "clocks", "kites"]
_SPECIALTIES = ["cheese", "glassware", "lanterns", "honey", "pottery", "apples", "clock towers", "carpets",
                "lace", "cider"]


class _NamePool:
    """Draws invented names for one passage, never reusing a name's leading part.

    Distinct leading parts keep the entities of a passage easy to tell apart ("Larkport" and
    "Larkholme" never meet), so a wrong answer means the model missed the fact, not a near-twin name.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _unused(self, parts: Sequence[str]) -> str:
        part = self.rng.choice([candidate for candidate in parts if candidate not in self.used])
        self.used.add(part)
        return part

    def person(self) -> str:
        pick = self.rng.choice
        return f"{self._unused(_FIRST_START)}{pick(_FIRST_END)} {self._unused(_SURNAME_START)}{pick(_SURNAME_END)}"

    def town(self) -> str:
        return f"{self._unused(_TOWN_START)}{self.rng.choice(_TOWN_END)}"

    def company(self) -> str:
        pick = self.rng.choice
        return f"{self._unused(_COMPANY_START)}{pick(_COMPANY_END)} {pick(_COMPANY_SUFFIX)}"

    def ship(self) -> str:
        return f"{self._unused(_SHIP_ADJECTIVE)} {self._unused(_SHIP_NOUN)}"


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


@dataclass(frozen=True)
class _Attribute:
    """One kind of fact about an entity: how to draw distinct values, state it and ask about it.

    `statements` are alternative phrasings with {e} for the entity (as written mid-sentence) and {v}
    for the value; `question` asks for the value. `golds` turns a value into accepted answers.
    """

    draw: Callable[[random.Random, _NamePool, int], list[str]]
    statements: tuple[str, ...]
    question: str
    golds: Callable[[str], tuple[str, ...]] = lambda value: (value,)


def _distinct(pool: Sequence[str]) -> Callable[[random.Random, _NamePool, int], list[str]]:
    return lambda rng, names, count: rng.sample(pool, count)


def _years(rng: random.Random, names: _NamePool, count: int) -> list[str]:
    return [str(year) for year in rng.sample(range(1890, 2016), count)]


def _counts(low: int, high: int) -> Callable[[random.Random, _NamePool, int], list[str]]:
    return lambda rng, names, count: [f"{number:,}" for number in rng.sample(range(low, high), count)]


def _people(rng: random.Random, names: _NamePool, count: int) -> list[str]:
    return [names.person() for _ in range(count)]


def _towns(rng: random.Random, names: _NamePool, count: int) -> list[str]:
    return [names.town() for _ in range(count)]


@dataclass(frozen=True)
class _EntityKind:
    name: Callable[[_NamePool], str]
    mention: str  # how the entity is written mid-sentence, e.g. "the {name}" for ships
    attributes: dict[str, _Attribute]


_ENTITY_KINDS = (
    _EntityKind(
        name=_NamePool.person, mention="{name}",
        attributes={
            "town": _Attribute(_towns, ("{e} lives in {v}.", "{e} has made a home in {v}."),
                               "In which town does {e} live?"),
            "profession": _Attribute(lambda rng, names, count: [_a(p) for p in rng.sample(_PROFESSIONS, count)],
                                     ("{e} works as {v}.", "By trade, {e} is {v}."),
                                     "What is {e}'s job?", golds=lambda value: (value.split(" ", 1)[1],)),
            "birth year": _Attribute(_years, ("{e} was born in {v}.",), "In what year was {e} born?"),
            "colour": _Attribute(_distinct(_COLOURS), ("{e}'s favourite colour is {v}.",),
                                 "What is {e}'s favourite colour?"),
            "pet": _Attribute(_distinct(_ANIMALS), ("{e} keeps a pet {v}.", "{e} shares a house with a pet {v}."),
                              "What kind of pet does {e} keep?"),
        },
    ),
    _EntityKind(
        name=_NamePool.company, mention="{name}",
        attributes={
            "founding year": _Attribute(_years, ("{e} was founded in {v}.",), "In what year was {e} founded?"),
            "headquarters": _Attribute(_towns, ("{e} has its headquarters in {v}.", "{e} is based in {v}."),
                                       "In which town is {e} based?"),
            "product": _Attribute(_distinct(_PRODUCTS), ("{e} makes {v}.", "{e} is known for the {v} it sells."),
                                  "What does {e} make?"),
            "staff": _Attribute(_counts(20, 5000), ("{e} employs {v} people.",), "How many people does {e} employ?"),
            "founder": _Attribute(_people, ("{e} was started by {v}.",), "Who founded {e}?"),
        },
    ),
    _EntityKind(
        name=_NamePool.town, mention="{name}",
        attributes={
            "population": _Attribute(_counts(1_000, 95_000), ("{e} has a population of {v}.",),
                                     "What is the population of {e}?"),
            "river": _Attribute(lambda rng, names, count: [f"River {r}" for r in rng.sample(_RIVERS, count)],
                                ("{e} lies on the {v}.", "The {v} flows through {e}."),
                                "Which river flows through {e}?",
                                golds=lambda value: (value, value.removeprefix("River "))),
            "specialty": _Attribute(_distinct(_SPECIALTIES), ("{e} is famous for its {v}.",),
                                    "What is {e} famous for?"),
            "mayor": _Attribute(_people, ("The mayor of {e} is {v}.",), "Who is the mayor of {e}?"),
            "founding year": _Attribute(_years, ("{e} was founded in {v}.",), "In what year was {e} founded?"),
        },
    ),
    _EntityKind(
        name=_NamePool.ship, mention="the {name}",
        attributes={
            "hull colour": _Attribute(_distinct(_COLOURS), ("The hull of {e} is painted {v}.",),
                                      "What colour is the hull of {e}?"),
            "launch year": _Attribute(_years, ("{e} was launched in {v}.",), "In what year was {e} launched?"),
            "captain": _Attribute(_people, ("{e} is commanded by Captain {v}.",), "Who is the captain of {e}?"),
            "passengers": _Attribute(_counts(12, 900), ("{e} can carry {v} passengers.",),
                                     "How many passengers can {e} carry?"),
            "home port": _Attribute(_towns, ("{e} sails from {v}.", "The home port of {e} is {v}."),
                                    "What is the home port of {e}?"),
        },
    ),
)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _context_qa_item(index: int, rng: random.Random) -> Example:
    """One passage about 3-4 entities of one kind, 3 facts each, and a question about one fact.

    All entities get the same three kinds of fact, so the passage always holds distractors of the
    asked type (other towns, other years, ...) and only reading the right sentence gives the answer.
    """
    while True:
        names = _NamePool(rng)
        kind = rng.choice(_ENTITY_KINDS)
        entity_count = rng.randint(3, 4)
        entities = [kind.name(names) for _ in range(entity_count)]
        asked = rng.sample(sorted(kind.attributes), 3)
        values = {attribute: kind.attributes[attribute].draw(rng, names, entity_count) for attribute in asked}

        sentences = []
        for position, entity in enumerate(entities):
            mention = kind.mention.format(name=entity)
            for attribute in rng.sample(asked, len(asked)):
                statement = rng.choice(kind.attributes[attribute].statements)
                sentences.append(_sentence(statement.format(e=mention, v=values[attribute][position])))
        passage = " ".join(sentences)

        target = rng.randrange(entity_count)
        attribute = rng.choice(asked)
        spec = kind.attributes[attribute]
        question = _sentence(spec.question.format(e=kind.mention.format(name=entities[target])))
        golds = spec.golds(values[attribute][target])
        distractors = [spec.golds(value)[0] for position, value in enumerate(values[attribute]) if position != target]
        # Redraw in the rare case an invented answer happens to be spelled inside the question.
        if not any(gold.lower() in question.lower() for gold in golds):
            return Example(f"context-qa-{index:04d}",
                           {"passage": passage, "question": question, "distractors": " | ".join(distractors)},
                           golds)


def context_qa(size: int = CONTEXT_QA_SIZE, seed: int = CONTEXT_QA_SEED) -> Task:
    """Reading comprehension where the answer exists only in a passage of the prompt.

    Passages are generated from `seed` (same seed, same items) about invented people, companies,
    towns and ships, so no model knows the answers beforehand: they must travel by attention from
    the passage's tokens. Each item's `distractors` field lists the same-type values that the
    passage gives for the other entities (" | "-separated), for analysing wrong answers.
    """
    rng = random.Random(seed)
    examples = [_context_qa_item(index, rng) for index in range(size)]
    return make_reading_task(
        "context-qa", examples,
        "Reading comprehension over generated passages about invented entities, with same-type distractors.",
        source=f"generated by evals.tasks.context_qa (seed {seed})",
        licence="Apache-2.0 (project code)",
        credit="minillm",
    )


# --- summarization ---------------------------------------------------------------------------

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
    """The built-in task `name`, keeping only its first `limit` examples when given (order is fixed)."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    task = _BUILDERS[name]()
    if limit is None:
        return task
    if limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    return dataclasses.replace(task, examples=task.examples[:limit])
