"""Shared wording pools: names, things, places, filler sentences and step-label styles.

Every family draws its surface form from here, so that a head trained on some families sees
the same kinds of filler as the held-out one, and so that no single sentence dominates: filler
lines are built from an opener, a body of one of five styles (self-talk, restatement, planning,
hedging, meta comments) with slots filled from the pools, and a closer. No filler line states a
number or a fact, so filler never competes with the critical lines.
"""

from __future__ import annotations

import random

PEOPLE = (
    "Mara", "Tomas", "Ines", "Kofi", "Lena", "Ravi", "Sofia", "Jonas", "Aiko", "Pavel",
    "Nadia", "Omar", "Greta", "Hugo", "Yara", "Felix", "Leila", "Bruno", "Chloe", "Dmitri",
    "Elsa", "Farid", "Hana", "Ivan", "Julia", "Kenji", "Lucia", "Marco", "Nora", "Oscar",
    "Priya", "Quentin", "Rosa", "Samir", "Tess", "Ugo", "Vera", "Wendel", "Ximena", "Yusuf",
    "Zara", "Anton", "Bea", "Carlos", "Dalia", "Emil", "Freya", "Gustav", "Hira", "Igor",
    "Jana", "Kai", "Lotte", "Mateo", "Nina", "Otto", "Paula", "Rafael", "Selma", "Theo",
)  # fmt: skip
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "brown",
    "pink", "silver", "golden", "teal", "violet", "amber",
)  # fmt: skip
CITIES = (
    "Oslo", "Lisbon", "Cairo", "Lima", "Dublin", "Vienna", "Nairobi", "Quito", "Hanoi",
    "Kyoto", "Madrid", "Prague", "Riga", "Tunis", "Zagreb", "Bergen", "Porto", "Seville",
    "Krakow", "Geneva", "Malmo", "Perth", "Tallinn", "Leeds",
)  # fmt: skip
JOBS = (
    "baker", "pilot", "nurse", "farmer", "painter", "teacher", "plumber", "chemist", "tailor",
    "writer", "sailor", "dentist", "courier", "gardener", "librarian", "engineer",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "ferret", "lizard",
    "pony", "goat", "canary",
)  # fmt: skip
OBJECTS = (
    "crate", "box", "barrel", "suitcase", "parcel", "basket", "trunk", "chest", "sack", "bin",
    "case", "drum",
)  # fmt: skip
PLACES = (
    "north", "south", "east", "west", "river", "harbour", "garden", "market", "station",
    "library", "museum", "bakery", "school", "bridge",
)  # fmt: skip
WORDS = (
    "falcon", "maple", "copper", "lantern", "meadow", "thunder", "velvet", "pebble", "orchid",
    "glacier", "saffron", "compass", "walnut", "harbor", "cobalt", "juniper", "marble", "tundra",
)  # fmt: skip
# A unit (plural) and the containers that hold it, for tracking quantities.
QUANTITIES = (
    ("litres", ("tank", "barrel", "bucket", "cistern")),
    ("apples", ("basket", "crate", "bowl", "cart")),
    ("coins", ("jar", "purse", "box", "wallet")),
    ("books", ("shelf", "box", "cart", "library")),
    ("marbles", ("bag", "jar", "tin", "pouch")),
    ("tickets", ("drawer", "envelope", "booth", "folder")),
    ("boxes", ("truck", "van", "storeroom", "warehouse")),
    ("passengers", ("bus", "train car", "ferry", "tram")),
)  # fmt: skip

OPENERS = (
    "Okay,", "Hmm,", "Alright,", "Right,", "Well,", "So,", "Let me see,", "Wait,", "Now,",
    "Good,", "Fine,", "Actually,", "Honestly,", "Anyway,",
)  # fmt: skip
CLOSERS = (
    "", "", "", "", " Fine.", " Good.", " Moving on.", " Let me continue.", " Okay.",
    " That seems right.", " Nothing more to add.", " On to the next part.",
)  # fmt: skip
# Bodies start lowercase (capitalised when no opener comes first); slots: {topic} (what the
# family is about: a singular noun phrase), {name}, {place}, {colour}, {word}.
BODIES = {
    "self_talk": (
        "let me keep {topic} in mind and move on.",
        "I think I have {topic} straight now.",
        "I should not rush; {topic} needs a careful look.",
        "this part is easy to follow if I go slowly.",
        "I almost lost track of {topic} there, but it is fine.",
        "my head is clear about {topic} at this point.",
        "I keep wanting to skip ahead, which is a bad idea.",
        "I was thinking about the {place} for a second, but that is irrelevant.",
        "talking it through helps me with {topic}.",
        "I need to stay focused on {topic}.",
    ),
    "restatement": (
        "to restate: the question is about {topic}, and nothing here changes it.",
        "in other words, {topic} is still what matters.",
        "put differently, I only need {topic} to answer.",
        "the task, once more, is to work with {topic}.",
        "so the goal has not moved: it is about {topic}.",
        "said plainly, this sentence only repeats what the task asks.",
        "the question still concerns {topic} and nothing else.",
        "to say it again, {topic} is the whole point here.",
    ),
    "planning": (
        "next I will go through {topic} once more.",
        "the plan is to check {topic} and then answer.",
        "after this I will look at {topic} again.",
        "I will organise my notes before the final answer.",
        "first I finish this pass, then I return to {topic}.",
        "my next step is to make sure {topic} is complete.",
        "I will leave the details of the {place} aside for now.",
        "once {topic} is settled, the answer should follow.",
        "I can answer after one more look at {topic}.",
    ),
    "hedging": (
        "I might be wrong about the wording, but {topic} seems clear.",
        "probably this remark does not matter for {topic}.",
        "it is possible that I misread something, though I doubt it.",
        "I am fairly sure about {topic}, but not completely.",
        "maybe the mention of {name} is a distraction.",
        "this could be important, or it could be nothing at all.",
        "I suspect the {colour} detail is only decoration.",
        "unless I missed something, {topic} is unchanged.",
        "perhaps I am overthinking {topic}.",
    ),
    "meta": (
        "this line is only commentary.",
        "I am writing this down to keep track of {topic}.",
        "this is a note to myself, not a new fact.",
        "the text around here is mostly background.",
        "nothing in this sentence is new information.",
        "this remark about the word {word} carries no information.",
        "a small aside: the story mentions {name}, which does not matter.",
        "I will note that {topic} came up earlier.",
        "this step is bookkeeping rather than reasoning.",
    ),
}
STYLES = tuple(BODIES)

LABEL_STYLES = ("step", "step_dot", "paren", "dot", "dash", "bullet", "ordinal", "none")
ORDINALS = ("Next:", "Then:", "After that:", "Also:", "Now:", "Further:")

ANSWER_LEADS = (
    "", "", "", "Answer: ", "So, to answer the question: ", "From my notes: ",
    "Final answer. ", "Putting it together: ", "The question asked for this. ",
)  # fmt: skip


def capitalise(text: str) -> str:
    """`text` with its first character upper-cased (the rest untouched)."""
    return text[:1].upper() + text[1:]


def fill(template: str, rng: random.Random, topic: str) -> str:
    """`template` with its slots filled from the pools ({topic} is given)."""
    return template.format(
        topic=topic,
        name=rng.choice(PEOPLE),
        place=rng.choice(PLACES),
        colour=rng.choice(COLOURS),
        word=rng.choice(WORDS),
    )


def filler_line(rng: random.Random, topics: tuple[str, ...]) -> str:
    """One filler sentence (or two) that states no fact: opener, a body of a random style with
    its slots filled, closer."""
    first = rng.choice(BODIES[rng.choice(STYLES)])
    body = fill(first, rng, rng.choice(topics))
    if rng.random() < 0.2:
        second = rng.choice(BODIES[rng.choice(STYLES)])
        if second != first:
            body += " " + capitalise(fill(second, rng, "it"))
    if rng.random() < 0.5:
        line = f"{rng.choice(OPENERS)} {body}"
    else:
        line = capitalise(body)
    return line + rng.choice(CLOSERS)


def step_label(style: str, number: int, rng: random.Random) -> str:
    """The label of the `number`-th labelled line (1-based) in `style`, with a trailing space
    ("" for style "none")."""
    if style == "step":
        return f"Step {number}: "
    if style == "step_dot":
        return f"Step {number}. "
    if style == "paren":
        return f"{number}) "
    if style == "dot":
        return f"{number}. "
    if style == "dash":
        return "- "
    if style == "bullet":
        return "* "
    if style == "ordinal":
        return "First: " if number == 1 else f"{rng.choice(ORDINALS)} "
    if style == "none":
        return ""
    raise ValueError(f"unknown step-label style {style!r}")
