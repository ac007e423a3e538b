"""Family `arithmetic`: multi-step arithmetic whose early results are reused late.

"Let a = 17 + 26 = 43." ... filler and unrelated results ... "Reusing a: c = a + 8, which gives
51." ... "</think> The value of c is" -> "51". The asked value is the late result (which needs
the early one) or one of the early results itself.
"""

from __future__ import annotations

import random
from typing import Any

from thinfer.dynts.corpus.assemble import Draft, Line, grow
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.corpus.wording import ANSWER_LEADS
from thinfer.loading.tokenizer import Tokenizer

MIN_TOKENS = 150
VARIABLES = ("abcdefg", "xyzwuvt", "pqrsmnk", "ABCDEFG", "PQRSTUV")
SYMBOLS = {"+": ("+",), "-": ("-",), "*": ("*", "×")}
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
DEFINES = (
    "Let {v} = {x} {s} {y} = {r}.",
    "{x} {w} {y} gives {r}; call it {v}.",
    "Set {v} to {x} {s} {y}, which is {r}.",
    "{v} is {x} {s} {y}, that is {r}.",
    "Compute {v}: {x} {s} {y} = {r}.",
    "Define {v} as {x} {s} {y}. That equals {r}.",
    "For {v} I get {x} {s} {y} = {r}.",
)
REUSES = (
    "Now {v} = {x} {s} {y} = {r}.",
    "Taking {x} from before, {x} {s} {y} = {r}, so {v} = {r}.",
    "Reusing {x}: {v} = {x} {s} {y}, which gives {r}.",
    "Going back to {x} ({xv}), {v} = {xv} {s} {y} = {r}.",
    "With {x} = {xv}, {v} comes to {xv} {s} {y} = {r}.",
    "Finally {v} = {x} {s} {y} = {r}.",
    "Using the earlier {x}, {v} is {x} {w} {y}, that is {r}.",
)
PREFIXES = (
    "The value of {v} is",
    "So {v} equals",
    "{v} comes out as",
    "The result for {v} is",
    "Therefore {v} =",
    "In the end {v} is",
)
QUESTIONS = ("What is {v}?", "Report the value of {v}.", "Which number is {v}?")
INTROS = (
    "Work out the quantities below; some results are used again later.",
    "Compute step by step and keep the intermediate results.",
    "Several values are defined and combined.",
    "Do the arithmetic carefully; commentary is mixed in.",
    "Calculate the named values, then answer.",
)
TOPICS = ("the calculation", "each intermediate result", "the arithmetic", "the last sum")


def _operation(rng: random.Random, left: int) -> tuple[str, int]:
    """An operator and a right operand for `left` that keep the result positive."""
    op = rng.choice(("+", "+", "-", "*"))
    if op == "*":
        return op, rng.randint(2, 9)
    if op == "-" and left > 3:
        return op, rng.randint(1, left - 1)
    return "+", rng.randint(2, 60)


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _text(template: str, rng: random.Random, step: dict[str, Any], values: dict) -> str:
    x, y, op = step["left"], step["right"], step["op"]
    return template.format(
        v=step["name"], x=x, y=y, r=step["value"], s=rng.choice(SYMBOLS[op]),
        w=OP_WORDS[op], xv=values.get(x, x),
    )  # fmt: skip


def draft(rng: random.Random, target_tokens: int) -> Draft:
    """Two or three early results, up to two unrelated ones, then one or two late results
    built on the early ones."""
    names = iter(rng.choice(VARIABLES))
    room = max(3, target_tokens // 90)
    early = rng.randint(2, min(3, room - 1))
    distract = rng.randint(0, max(0, min(2, room - early - 1)))
    late = rng.randint(1, max(1, min(2, room - early - distract)))
    steps: list[dict[str, Any]] = []
    values: dict[str, int] = {}
    lines = []
    for group, count, zone in (("early", early, (0.0, 0.35)), ("other", distract, (0.1, 0.7))):
        for _ in range(count):
            x = rng.randint(5, 60)
            op, y = _operation(rng, x)
            step = {"name": next(names), "op": op, "left": x, "right": y}
            steps.append({**step, "value": _apply(op, x, y), "group": group})
            values[step["name"]] = steps[-1]["value"]
            lines.append(Line(_text(rng.choice(DEFINES), rng, steps[-1], values), zone))
    bases = [s["name"] for s in steps if s["group"] == "early"]
    for _ in range(late):
        x = rng.choice(bases)
        y: int | str
        op, y = _operation(rng, values[x])
        if rng.random() < 0.3:  # combine two early results
            y = rng.choice([b for b in bases if b != x])
            op = "+"
        value = _apply(op, values[x], values[y] if isinstance(y, str) else y)
        name = next(names)
        steps.append({"name": name, "op": op, "left": x, "right": y, "value": value})
        steps[-1]["group"] = "late"
        values[name] = value
        lines.append(Line(_text(rng.choice(REUSES), rng, steps[-1], values), (0.65, 1.0)))
    pool = [s for s in steps if s["group"] == "late"]
    if rng.random() < 0.35:
        pool = [s for s in steps if s["group"] == "early"]
    asked = rng.choice(pool)
    return Draft(
        family="arithmetic",
        prompt=f"{rng.choice(INTROS)} {rng.choice(QUESTIONS).format(v=asked['name'])}",
        lines=lines,
        prefix=rng.choice(PREFIXES).format(v=asked["name"]),
        answer=str(asked["value"]),
        topics=TOPICS,
        record={"steps": steps, "asked": asked["name"]},
        lead=rng.choice(ANSWER_LEADS),
    )


def make(
    tokenizer: Tokenizer, rng: random.Random, index: int, target_tokens: int, think_end: str
) -> CorpusProblem:
    """One arithmetic problem of about `target_tokens` tokens."""
    return grow(tokenizer, rng, draft(rng, target_tokens), index, target_tokens, think_end)
