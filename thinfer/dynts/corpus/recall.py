"""Family `recall`: a few facts stated early (or spread out), filler, then a question.

"Mara's locker number is 381." ... filler ... "</think> Mara's locker number is" -> "381".
Ten kinds of fact, each with three statement templates and two or three answer prefixes, so a
trace rarely states a fact in the words its question uses.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from thinfer.dynts.corpus.assemble import Draft, Line, grow
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.corpus.wording import (
    ANIMALS,
    ANSWER_LEADS,
    CITIES,
    COLOURS,
    OBJECTS,
    PEOPLE,
    PLACES,
    WORDS,
    capitalise,
)
from thinfer.loading.tokenizer import Tokenizer

MIN_TOKENS = 160
Pick = Callable[[random.Random], str]


@dataclass(frozen=True)
class Kind:
    """One kind of fact: who it is about, its value, how it is stated and asked."""

    holder: Pick
    value: Pick
    statements: tuple[str, ...]  # slots {h} (holder), {H} (capitalised), {v} (value)
    prefixes: tuple[str, ...]
    question: str


def _person(rng: random.Random) -> str:
    return rng.choice(PEOPLE)


def _number(lo: int, hi: int) -> Pick:
    return lambda rng: str(rng.randint(lo, hi))


def _word(pool: tuple[str, ...]) -> Pick:
    return lambda rng: rng.choice(pool)


KINDS = {
    "locker": Kind(
        _person,
        _number(100, 999),
        ("{H}'s locker number is {v}.", "{H} was given locker {v}.",
         "The locker assigned to {h} is number {v}."),
        ("{H}'s locker number is", "The locker of {h} has number"),
        "What is {h}'s locker number?",
    ),
    "weight": Kind(
        lambda rng: f"the {rng.choice(COLOURS)} {rng.choice(OBJECTS)}",
        _number(12, 95),
        ("{H} weighs {v} kg.", "On the scale, {h} comes to {v} kg.",
         "{H} has a weight of {v} kilograms."),
        ("{H} weighs", "The weight of {h} in kg is"),
        "How heavy is {h}?",
    ),
    "room": Kind(
        _person,
        _number(10, 99),
        ("{H} is staying in room {v}.", "{H}'s room is number {v}.",
         "The hotel put {h} in room {v}."),
        ("{H} is staying in room", "The room number of {h} is"),
        "Which room is {h} in?",
    ),
    "gate": Kind(
        lambda rng: f"the {rng.choice(PLACES)} gate",
        _number(1000, 9999),
        ("The code for {h} is {v}.", "To open {h}, type {v}.", "{H} opens with the code {v}."),
        ("The code for {h} is", "{H} opens with the code"),
        "What is the code for {h}?",
    ),
    "born": Kind(
        _person,
        _number(1940, 2015),
        ("{H} was born in {v}.", "{H}'s birth year is {v}.",
         "Records show {h} was born in the year {v}."),
        ("{H} was born in", "The birth year of {h} is"),
        "When was {h} born?",
    ),
    "colour": Kind(
        _person,
        _word(COLOURS),
        ("{H}'s favourite colour is {v}.", "{H} likes {v} more than any other colour.",
         "Asked about colours, {h} picked {v}."),
        ("{H}'s favourite colour is", "The colour {h} prefers is"),
        "What is {h}'s favourite colour?",
    ),
    "platform": Kind(
        lambda rng: f"the train to {rng.choice(CITIES)}",
        _number(1, 24),
        ("{H} leaves from platform {v}.", "Platform {v} is where {h} departs.",
         "{H} departs from platform {v}."),
        ("{H} leaves from platform", "The platform for {h} is"),
        "Which platform does {h} leave from?",
    ),
    "password": Kind(
        _person,
        _word(WORDS),
        ("The password for {h}'s account is {v}.", "{H} chose {v} as a password.",
         "{H}'s secret word is {v}."),
        ("The password for {h}'s account is", "{H}'s secret word is"),
        "What is {h}'s password?",
    ),
    "pet": Kind(
        _person,
        _word(ANIMALS),
        ("{H} owns a {v}.", "At home, {h} keeps a {v}.", "{H}'s only pet is a {v}."),
        ("{H}'s pet is a", "The animal {h} keeps is a"),
        "Which pet does {h} have?",
    ),
    "order": Kind(
        _person,
        _number(2, 40),
        ("{H} ordered {v} sandwiches.", "The order from {h} was {v} sandwiches.",
         "{H} asked for {v} sandwiches."),
        ("The number of sandwiches {h} ordered is", "{H}'s sandwich order was"),
        "How many sandwiches did {h} order?",
    ),
}  # fmt: skip
FACT_LEADS = ("", "", "", "Note: ", "Noted: ", "Important: ", "Fact: ", "Remember: ")
INTROS = (
    "Read the notes below and answer the question at the end.",
    "Some facts are mixed with commentary. Keep the facts; a question follows.",
    "Work through the notes. Only a few sentences matter.",
    "Below is a stream of thoughts with a few facts in it. Answer using those facts.",
    "Think it through, then answer from what was stated.",
    "A few details are given among many remarks. Recall the right one at the end.",
)
TOPICS = ("the list of facts", "what was stated", "the key detail", "the question", "each fact")


def draft(rng: random.Random, target_tokens: int) -> Draft:
    """Two to five facts (fewer on short traces), early or spread out; one is asked."""
    count = rng.randint(2, max(2, min(5, target_tokens // 120)))
    zone = rng.choice(((0.0, 0.3), (0.0, 0.85)))
    facts, values, keys = [], set(), set()
    while len(facts) < count:
        key = rng.choice(list(KINDS))
        kind = KINDS[key]
        holder, value = kind.holder(rng), kind.value(rng)
        if (key, holder) in keys or value in values:
            continue
        keys.add((key, holder))
        values.add(value)
        facts.append({"kind": key, "holder": holder, "value": value})
    lines = []
    for fact in facts:
        template = rng.choice(KINDS[fact["kind"]].statements)
        h, v = fact["holder"], fact["value"]
        text = template.format(h=h, H=capitalise(h), v=v)
        lines.append(Line(rng.choice(FACT_LEADS) + text, zone))
    asked = rng.randrange(count)
    fact = facts[asked]
    kind = KINDS[fact["kind"]]
    h = fact["holder"]
    prefix = rng.choice(kind.prefixes).format(h=h, H=capitalise(h))
    question = capitalise(kind.question.format(h=h))
    return Draft(
        family="recall",
        prompt=f"{rng.choice(INTROS)} {question}",
        lines=lines,
        prefix=prefix,
        answer=fact["value"],
        topics=TOPICS,
        record={"facts": facts, "asked": asked},
        lead=rng.choice(ANSWER_LEADS),
    )


def make(
    tokenizer: Tokenizer, rng: random.Random, index: int, target_tokens: int, think_end: str
) -> CorpusProblem:
    """One recall problem of about `target_tokens` tokens."""
    return grow(tokenizer, rng, draft(rng, target_tokens), index, target_tokens, think_end)
