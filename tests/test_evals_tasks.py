"""The Task record, its shots/template/limit changes, and the four built-in tasks: sizes, prompts, leaks,
golds, chance levels."""

import dataclasses
import json
import math
import re

import pytest

from evals.metrics import normalize_answer, split_sentences
from evals.tasks import (
    CAPITALS_SHOTS,
    FACTOID_SHOTS,
    READING_TEMPLATE,
    SUMMARY_SHOT,
    TASKS,
    Example,
    Task,
    chance_level,
    context_qa,
    describe_tasks,
    evenly_spaced,
    get_task,
    swap_pairs,
    template_fields,
    truncate_at_stop,
    with_shots,
    with_template,
)
from minillm.tokenizer import ChatTemplate


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name) for name in TASKS}


def _toy_task(**overrides):
    settings = {
        "name": "toy", "description": "toy task", "template": "Q: {question}\nA:",
        "examples": (Example("a", {"question": "one?"}, ("1",)), Example("b", {"question": "two?"}, ("2",))),
        "metric": "squad", "primary": "exact_match", "max_new_tokens": 4, "stop": ("\n",),
    }
    return Task(**(settings | overrides))


# --- the record ------------------------------------------------------------------------------

def test_truncate_at_stop_cuts_at_the_earliest_stop_string():
    assert truncate_at_stop(" Madrid Q: What is the capital", ("\n", "Q:")) == "Madrid"
    assert truncate_at_stop("Paris\nQ: next", ("Q:", "\n")) == "Paris"
    assert truncate_at_stop("\n  Paris  \n\nmore", ("\n",)) == "Paris"  # leading line breaks are not the end
    assert truncate_at_stop(" no stop here ", ("\n",)) == "no stop here"
    assert truncate_at_stop("", ("\n",)) == ""
    once = truncate_at_stop(" A summary.\n\nArticle: next", ("\n\n", "Article:"))
    assert once == "A summary." == truncate_at_stop(once, ("\n\n", "Article:"))


def test_prompt_puts_demonstrations_before_the_question():
    shot = Example("s", {"question": "zero?"}, ("0", "nought"))
    task = _toy_task(shots=(shot,), shot_separator="\n\n")
    assert task.prefix == "Q: zero?\nA: 0\n\n"
    assert task.prompt(task.examples[1]) == "Q: zero?\nA: 0\n\nQ: two?\nA:"
    assert _toy_task().prompt(task.examples[0]) == "Q: one?\nA:"


def test_score_postprocesses_the_generation():
    task = _toy_task()
    assert task.score(" 2\nQ: three?", task.examples[1]) == {"exact_match": 1.0, "f1": 1.0}
    assert task.score(" 1", task.examples[1])["exact_match"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"metric": "bleu"}, "unknown metric"),
        ({"primary": "rougeL"}, "primary key"),
        ({"template": "Q: {question} {topic}\nA:"}, "no field 'topic'"),
        ({"examples": ()}, "no examples"),
        ({"examples": (Example("a", {"question": "one?"}, ()),)}, "non-empty gold"),
        ({"examples": (Example("a", {"question": "one?"}, ("  ",)),)}, "non-empty gold"),
    ],
)
def test_task_rejects_inconsistent_records(overrides, message):
    with pytest.raises(ValueError, match=message):
        _toy_task(**overrides)


def test_chance_level_by_hand():
    distinct = [Example(str(i), {}, (gold,)) for i, gold in enumerate(["Paris", "Rome", "Oslo"])]
    assert chance_level(distinct, "squad", "exact_match") == 0.0
    same = [Example(str(i), {}, ("Paris",)) for i in range(3)]
    assert chance_level(same, "squad", "exact_match") == 1.0
    # Two examples: each must be answered with the other's gold, whatever the seed.
    pair = [Example("a", {}, ("new york city",)), Example("b", {}, ("york",))]
    assert chance_level(pair, "f1", "f1", seed=5) == pytest.approx((0.5 + 0.5) / 2)
    assert math.isnan(chance_level(distinct[:1], "squad", "exact_match"))


def test_get_task_limit_and_unknown_names():
    assert TASKS == ("capitals", "fanoutqa", "context-qa", "summarization")
    limited, everything = get_task("capitals", limit=5), get_task("capitals").examples
    step = len(everything) / 5  # "limit" means examples spread evenly over the task, everywhere
    assert limited.examples == tuple(everything[int(i * step)] for i in range(5))
    with pytest.raises(KeyError, match="built-in tasks: capitals"):
        get_task("squad")
    with pytest.raises(ValueError, match="at least 1"):
        get_task("capitals", limit=0)


# --- shots, templates, limits, chat, settings ----------------------------------------------

def _numbered_task(size=10, **overrides):
    examples = tuple(Example(f"e{i}", {"question": f"q{i}?", "context": f"c{i}."}, (f"a{i}",)) for i in range(size))
    return _toy_task(examples=examples, **overrides)


def ids(examples):
    return tuple(example.id for example in examples)


def test_with_shots_draws_from_the_data_by_seed_and_never_scores_a_shot():
    task = _numbered_task()
    one = with_shots(task, 1, seed=3)
    assert len(one.shots) == 1 and len(one.examples) == 9 and one.shot_seed == 3
    assert one.shots[0] not in one.examples
    assert one.prompt(one.examples[0]).count("A:") == 2  # one demonstration, then the scored question
    assert with_shots(task, 1, seed=3) == one  # deterministic
    assert len({ids(with_shots(task, 2, seed=seed).shots) for seed in range(6)}) > 1
    # Redrawing puts earlier drawn shots back first; zero shots scores all the data.
    assert set(ids(with_shots(one, 0).examples)) == set(ids(task.examples)) and with_shots(one, 0).shots == ()
    three = with_shots(one, 3, seed=1)
    assert sorted(ids(three.examples) + ids(three.shots)) == sorted(ids(task.examples))
    # Hand-written demonstrations are replaced, not added to.
    fixed = _numbered_task(shots=(Example("s", {"question": "zero?", "context": "."}, ("0",)),))
    assert "zero?" not in with_shots(fixed, 1).prompt(task.examples[0])
    with pytest.raises(ValueError, match="no example to score"):
        with_shots(task, 10)


def test_reading_tasks_draw_their_demonstrations_instead_of_a_fixed_year():
    task = get_task("context-qa")
    assert len(task.shots) == 2 and task.shot_seed == 0
    shot_answers = [shot.golds[0] for shot in task.shots]
    assert "1971" not in shot_answers
    assert not all(re.fullmatch(r"\d{4}", answer) for answer in shot_answers)
    assert all(f"Answer: {answer}\n\n" in task.prefix for answer in shot_answers)


def test_with_template_fills_named_fields_and_names_an_unknown_one():
    task = with_template(_numbered_task(), "Context: {context}\nQ: {question}\nShort answer:")
    assert task.prompt(task.examples[1]) == "Context: c1.\nQ: q1?\nShort answer:"
    with pytest.raises(ValueError, match=r"unknown field \{passage\}.*its fields: \{context\}, \{question\}"):
        with_template(_numbered_task(), "{passage} {question}")
    with pytest.raises(ValueError, match="no field"):
        with_template(_numbered_task(), "Answer:")
    for bad in ("{0}", "{}", "{question.upper}", "{question!r}", "Q: {question"):
        with pytest.raises(ValueError, match="template"):
            template_fields(bad)
    assert template_fields("{{literal}} {question}") == ["question"]


def test_evenly_spaced_is_the_one_meaning_of_limit():
    task = _numbered_task()
    assert [example.id for example in evenly_spaced(task, 3).examples] == ["e0", "e3", "e6"]
    assert evenly_spaced(task, None) is task and evenly_spaced(task, 50) is task
    with pytest.raises(ValueError, match="at least 1"):
        evenly_spaced(task, 0)


def test_chat_prompts_are_demonstration_turns_in_the_models_template():
    chat = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    task = dataclasses.replace(with_shots(_numbered_task(), 1, seed=0), chat=chat)
    shot, example = task.shots[0], task.examples[0]
    assert task.prompt(example) == (f"<user>Q: {shot.fields['question']}\nA:</user>"
                                    f"<assistant>{shot.golds[0]}</assistant>"
                                    f"<user>Q: {example.fields['question']}\nA:</user><assistant>")


def test_settings_change_with_anything_that_changes_prompts_or_scores():
    task = with_shots(_numbered_task(), 1)
    settings = task.settings()
    assert json.loads(json.dumps(settings)) == settings  # JSON-ready
    assert settings["shots"] == [task.shots[0].id] and settings["examples"] == 9
    changed = [
        with_template(task, "Question: {question}\nA:"),
        dataclasses.replace(task, max_new_tokens=5),
        with_shots(task, 1, seed=1),
        evenly_spaced(task, 4),
        dataclasses.replace(task, examples=(dataclasses.replace(task.examples[0], golds=("other",)),
                                            *task.examples[1:])),
        dataclasses.replace(task, chat=ChatTemplate("{{ messages[0].content }}")),
    ]
    for other in changed:
        assert other.settings() != settings
    assert with_shots(_numbered_task(), 1).settings() == settings


def test_describe_tasks_lists_every_builtin_task_with_its_size_metric_and_chance():
    rows = {row["task"]: row for row in describe_tasks()}
    assert list(rows) == list(TASKS)
    assert rows["capitals"]["examples"] == len(get_task("capitals").examples)
    assert rows["capitals"]["metric"] == "exact_match" and rows["summarization"]["metric"] == "rougeL"
    assert rows["summarization"]["chance"] == pytest.approx(get_task("summarization").chance)
    assert rows["context-qa"]["shots"] == 2


# --- every built-in task ---------------------------------------------------------------------

@pytest.mark.parametrize(("name", "minimum"),
                         [("capitals", 150), ("fanoutqa", 1000), ("context-qa", 200), ("summarization", 40)])
def test_builtin_task_sizes(tasks, name, minimum):
    assert len(tasks[name].examples) >= minimum


@pytest.mark.parametrize("name", TASKS)
def test_builtin_examples_are_well_formed(tasks, name):
    task = tasks[name]
    assert task.name == name and task.description and task.source and task.licence and task.credit
    ids = [example.id for example in task.examples]
    assert len(set(ids)) == len(ids)
    for example in task.examples:
        assert example.golds and all(gold.strip() for gold in example.golds)
        assert task.prompt(example).startswith(task.prefix)


@pytest.mark.parametrize("name", TASKS)
def test_no_example_leaks_a_demonstration(tasks, name):
    task = tasks[name]
    assert task.shots
    for shot in task.shots:
        for value in shot.fields.values():
            assert all(value not in example.fields.values() for example in task.examples)


@pytest.mark.parametrize("name", TASKS)
def test_chance_is_a_level_below_answering_with_the_gold(tasks, name):
    task = tasks[name]
    assert 0.0 <= task.chance < 0.5
    for example in task.examples:
        assert task.score(example.golds[0], example)[task.primary] == pytest.approx(1.0)


# --- capitals --------------------------------------------------------------------------------

def test_capitals_prompt_is_the_papers_qa_form_three_shot(tasks):
    capitals = tasks["capitals"]
    france = next(example for example in capitals.examples if example.fields["country"] == "France")
    assert capitals.prompt(france) == (
        "Q: What is the capital of Spain?\nA: Madrid\n\nQ: What is the capital of Japan?\nA: Tokyo\n\n"
        "Q: What is the capital of Kenya?\nA: Nairobi\n\nQ: What is the capital of France?\nA:")
    assert capitals.score(" Paris\n\nQ: What is the capital of Italy?\nA: Rome", france)["exact_match"] == 1.0
    assert capitals.shots == CAPITALS_SHOTS


def test_capitals_excludes_the_shots_and_answers_hidden_in_the_question(tasks):
    examples = tasks["capitals"].examples
    assert not {"Spain", "Japan", "Kenya"} & {example.fields["country"] for example in examples}
    for example in examples:
        country_words = normalize_answer(example.fields["country"]).split()
        for gold in example.golds:
            for word in normalize_answer(gold).split():
                assert all(word not in country_word and country_word not in word for country_word in country_words), (
                    example.fields["country"], gold)


def test_capitals_aliases():
    golds = {example.fields["country"]: example.golds for example in get_task("capitals").examples}
    assert golds["Ukraine"] == ("Kyiv", "Kiev")
    assert golds["the United States"] == ("Washington, D.C.", "Washington")
    assert golds["India"] == ("New Delhi",)  # Delhi is the territory, not another name for the capital


def test_swap_pairs():
    pairs = swap_pairs()
    countries = {example.fields["country"] for example in get_task("capitals").examples}
    assert {recipient.fields["country"] for recipient, _ in pairs} == countries  # each recipient once
    for recipient, donor in pairs:
        assert recipient.id != donor.id
        assert not {normalize_answer(g) for g in recipient.golds} & {normalize_answer(g) for g in donor.golds}
    assert swap_pairs(limit=10) == pairs[:10]
    assert swap_pairs(limit=10, seed=0) == swap_pairs(limit=10, seed=0)
    assert swap_pairs(limit=10, seed=1) != swap_pairs(limit=10, seed=0)


# --- fanoutqa --------------------------------------------------------------------------------

def test_fanoutqa_keeps_short_factoids_and_credits_the_dataset(tasks):
    task = tasks["fanoutqa"]
    assert task.licence == "CC BY-SA 4.0" and "FanOutQA" in task.credit and "Andrew Zhu" in task.credit
    shot_questions = {shot.fields["question"] for shot in FACTOID_SHOTS}
    questions = [example.fields["question"] for example in task.examples]
    assert not shot_questions & set(questions)
    assert len({question.lower() for question in questions}) == len(questions)  # duplicates were merged
    for example in task.examples:
        assert not example.fields["question"].lower().startswith("how old")
        assert all(len(gold.split()) <= 5 and " and " not in gold for gold in example.golds)
    assert task.prompt(task.examples[0]).startswith("Q: Who wrote the novel Pride and Prejudice?\nA: Jane Austen\n"
                                                    "Q: In what year did the Berlin Wall fall?\nA: 1989\nQ: ")


# --- context-qa ------------------------------------------------------------------------------

def test_context_qa_answer_is_in_the_passage_only(tasks):
    for example in tasks["context-qa"].examples:
        passage, question = example.fields["context"], example.fields["question"]
        for gold in example.golds:
            assert gold in passage
            assert gold.lower() not in question.lower()


def test_context_qa_passages_hold_same_type_distractors(tasks):
    for example in tasks["context-qa"].examples:
        distractors = example.fields["distractors"].split(" | ")
        assert 2 <= len(distractors) <= 3
        for distractor in distractors:
            assert distractor in example.fields["context"]
            assert normalize_answer(distractor) not in {normalize_answer(gold) for gold in example.golds}
            # Same type: a year for a year, a number for a number, a word for a word.
            assert bool(re.fullmatch(r"[\d,]+", distractor)) == bool(re.fullmatch(r"[\d,]+", example.golds[0]))


def test_context_qa_is_varied_and_deterministic():
    task = context_qa(size=60)
    assert task.examples == context_qa(size=60).examples
    assert task.examples != context_qa(size=60, seed=1).examples
    assert len({example.fields["question"].split()[0] for example in task.examples}) >= 4  # In/What/Who/How...
    assert len({example.fields["context"] for example in task.examples}) == 58
    # Its two demonstrations come from its own data (seed 0) and are not scored.
    assert task.template == READING_TEMPLATE and task.shot_seed == 0 and len(task.shots) == 2
    assert {example.id for example in with_shots(task, 0).examples} == {f"context-qa-{i:04d}" for i in range(60)}
    assert not {shot.id for shot in task.shots} & {example.id for example in task.examples}


# --- summarization ---------------------------------------------------------------------------

def test_summarization_articles_and_summaries_have_the_promised_shape(tasks):
    task = tasks["summarization"]
    assert task.shots == (SUMMARY_SHOT,) and task.metric == "rouge" and task.primary == "rougeL"
    for example in task.examples:
        assert 80 <= len(example.fields["document"].split()) <= 200
        assert 1 <= len(split_sentences(example.golds[0])) <= 3
    assert task.score(" A summary.\n\nArticle: another", task.examples[0]) == task.score("A summary.", task.examples[0])
