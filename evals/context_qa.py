"""The context-qa generator: reading comprehension items over generated passages about invented entities.

Passages are generated from a seed (same seed, same items) about invented people, companies, towns
and ships, so no model knows the answers beforehand: they must travel by attention from the
passage's tokens. Every passage holds same-type distractors (other towns, other years) for the
entity asked about, and each item's `distractors` field lists them for analysing wrong answers.
`evals.tasks.context_qa` makes the task from these items; this module knows nothing of tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _context_qa_item(index: int, rng: random.Random) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """One passage about 3-4 entities of one kind, 3 facts each, and a question about one fact, as
    (id, fields, accepted answers).

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
            return (f"context-qa-{index:04d}",
                    {"context": passage, "question": question, "distractors": " | ".join(distractors)},
                    golds)


def generate_items(size: int = CONTEXT_QA_SIZE, seed: int = CONTEXT_QA_SEED) -> list[tuple[str, dict, tuple]]:
    """`size` items (id, fields, accepted answers), the same for the same seed."""
    rng = random.Random(seed)
    return [_context_qa_item(index, rng) for index in range(size)]
