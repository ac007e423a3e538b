"""Family `tracking`: quantities updated several times through the thinking; the answer is the
final value of one of them.

"The tank holds 12 litres at first." ... "3 litres leave the tank, so now there are 9." ...
"Nadia adds 9 litres to the tank." ... "</think> The tank ends up with" -> "18". The start and
update lines are the critical ones; a second, distracting quantity is often tracked alongside.
The running total is stated after some updates (always after the asked quantity's last one).
"""

from __future__ import annotations

import random

from thinfer.dynts.corpus.assemble import Draft, Line, grow
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.corpus.wording import ANSWER_LEADS, PEOPLE, QUANTITIES, capitalise
from thinfer.loading.tokenizer import Tokenizer

MIN_TOKENS = 180
STARTS = (
    "The {c} holds {v} {u} at first.",
    "At the start there are {v} {u} in the {c}.",
    "We begin with {v} {u} in the {c}.",
    "Initially the {c} contains {v} {u}.",
    "The {c} starts out with {v} {u}.",
    "There are {v} {u} in the {c} to begin with.",
)
ADDS = (
    "{name} adds {n} {u} to the {c}",
    "{n} more {u} go into the {c}",
    "Someone puts another {n} {u} in the {c}",
    "The {c} receives {n} {u}",
    "Then {n} {u} are added to the {c}",
    "{name} brings {n} extra {u} for the {c}",
    "The {c} gains {n} {u}",
)
REMOVES = (
    "{n} {u} are taken out of the {c}",
    "{name} removes {n} {u} from the {c}",
    "The {c} loses {n} {u}",
    "{n} {u} leave the {c}",
    "We take {n} {u} away from the {c}",
    "{name} uses up {n} {u} from the {c}",
    "{n} {u} are removed from the {c}",
)
TOTALS = (
    ", so now there are {t}.",
    "; the {c} has {t} {u} now.",
    ". Running total for the {c}: {t}.",
    ", which makes {t} {u}.",
    ". That leaves the {c} at {t} {u}.",
    ", bringing the {c} to {t}.",
)
PREFIXES = (
    "The {c} now holds",
    "In the end the {c} has",
    "The final number of {u} in the {c} is",
    "After all the changes, the {c} contains",
    "The {c} ends up with",
    "The final count for the {c} is",
)
QUESTIONS = (
    "How many {u} are in the {c} at the end?",
    "What is the final amount in the {c}?",
    "After all the changes, how many {u} does the {c} hold?",
)
INTROS = (
    "Keep track of the quantities below.",
    "Follow the changes step by step.",
    "Several things happen to some containers; watch the numbers.",
    "Track every change carefully; commentary is mixed in.",
    "Count along as things are added and removed.",
)
TOPICS = ("the running total", "the count", "each change", "the total so far", "the bookkeeping")


def _updates(rng: random.Random, start: int, count: int) -> list[int]:
    """Signed changes that never take the quantity below zero."""
    value, changes = start, []
    for _ in range(count):
        n = rng.randint(2, 20)
        change = -n if rng.random() < 0.45 and n <= value else n
        value += change
        changes.append(change)
    return changes


def draft(rng: random.Random, target_tokens: int) -> Draft:
    """One or two quantities, each with a start and several updates; one is asked."""
    unit, containers = rng.choice(QUANTITIES)
    two = target_tokens >= 450 and rng.random() < 0.6
    names = rng.sample(containers, 2 if two else 1)
    most = max(3, min(7, (target_tokens // (80 if two else 60)) - 1))
    entities = []
    for c in names:
        start = rng.randint(5, 60)
        updates = _updates(rng, start, rng.randint(3, most))
        entities.append({"container": c, "unit": unit, "start": start, "updates": updates})
        entities[-1]["value"] = start + sum(updates)
    asked = rng.randrange(len(entities))
    # Event order: starts first, then the updates of all quantities interleaved at random.
    events = [(i, None) for i in range(len(entities))]
    queue = [i for i, e in enumerate(entities) for _ in e["updates"]]
    rng.shuffle(queue)
    events += [(i, k) for i, k in zip(queue, _positions(queue), strict=True)]
    state_every = rng.choice((0.4, 0.7, 1.0))
    totals = [e["start"] for e in entities]
    lines = []
    for i, k in events:
        e = entities[i]
        c, u = e["container"], unit
        if k is None:
            lines.append(Line(rng.choice(STARTS).format(c=c, u=u, v=e["start"]), (0.0, 0.3)))
            continue
        change = e["updates"][k]
        totals[i] += change
        template = rng.choice(ADDS if change > 0 else REMOVES)
        text = template.format(name=rng.choice(PEOPLE), n=abs(change), u=u, c=c)
        last = k == len(e["updates"]) - 1
        if (i == asked and last) or rng.random() < state_every:
            text += rng.choice(TOTALS).format(t=totals[i], c=c, u=u)
        else:
            text += "."
        lines.append(Line(capitalise(text), (0.05, 1.0)))
    e = entities[asked]
    prefix = rng.choice(PREFIXES).format(c=e["container"], u=unit)
    question = rng.choice(QUESTIONS).format(c=e["container"], u=unit)
    return Draft(
        family="tracking",
        prompt=f"{rng.choice(INTROS)} {question}",
        lines=lines,
        prefix=capitalise(prefix),
        answer=str(e["value"]),
        topics=TOPICS,
        record={"entities": entities, "asked": asked},
        lead=rng.choice(ANSWER_LEADS),
    )


def _positions(queue: list[int]) -> list[int]:
    """For each entry of `queue`, how many earlier entries hold the same value."""
    seen: dict[int, int] = {}
    out = []
    for i in queue:
        out.append(seen.get(i, 0))
        seen[i] = out[-1] + 1
    return out


def make(
    tokenizer: Tokenizer, rng: random.Random, index: int, target_tokens: int, think_end: str
) -> CorpusProblem:
    """One tracking problem of about `target_tokens` tokens."""
    return grow(tokenizer, rng, draft(rng, target_tokens), index, target_tokens, think_end)
