"""Family `lookup`: a small table of records, filler, then a question for one field of one
record.

The table (3-6 records of a name and 2-4 other fields) is written in one of six formats:
"name - field - field" rows, an inline list, key: value blocks, one sentence per record, a
pipe table, a numbered list. "</think> According to the records, Mara is from" -> "Oslo".
"""

from __future__ import annotations

import random

from thinfer.dynts.corpus.assemble import Draft, Line, grow
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.corpus.wording import ANIMALS, ANSWER_LEADS, CITIES, COLOURS, JOBS, PEOPLE
from thinfer.loading.tokenizer import Tokenizer

MIN_TOKENS = 170
FIELDS = {
    "city": tuple(CITIES),
    "year": tuple(str(y) for y in range(1950, 2011)),
    "colour": tuple(COLOURS),
    "job": tuple(JOBS),
    "pet": tuple(ANIMALS),
    "age": tuple(str(a) for a in range(18, 91)),
}
PHRASES = {  # one record as a sentence
    "city": "lives in {v}",
    "year": "was born in {v}",
    "colour": "likes the colour {v}",
    "job": "works as a {v}",
    "pet": "has a {v}",
    "age": "is {v} years old",
}
FIELD_PREFIXES = {
    "city": ("{n} lives in", "{n}'s city is", "According to the records, {n} is from"),
    "year": ("The year listed for {n} is", "{n}'s year is", "{n} was born in"),
    "colour": ("{n}'s colour is", "The colour next to {n} is", "{n} likes the colour"),
    "job": ("{n} works as a", "{n}'s job is", "The job listed for {n} is"),
    "pet": ("{n}'s pet is a", "{n} has a", "The pet of {n} is a"),
    "age": ("{n}'s age is", "The age listed for {n} is", "{n} is this many years old:"),
}
GENERIC_PREFIXES = ("In the table, the {f} of {n} is", "Looking it up, {n}'s {f} is")
TABLE_LEADS = (
    "Here is the table:",
    "The records are:",
    "Data:",
    "I was given this list:",
    "These are the entries:",
    "The list reads as follows.",
)
FORMATS = ("rows", "inline", "keyvalue", "sentences", "pipes", "numbered")
QUESTIONS = ("What is the {f} of {n}?", "Find {n}'s {f}.", "Look up the {f} for {n}.")
INTROS = (
    "Use the records below to answer.",
    "A table of people is given; answer a question about it.",
    "Read the list carefully; there is commentary too.",
    "The records hold the answer.",
    "Look up the requested field once you have read everything.",
)
TOPICS = ("the table", "the record list", "the relevant row", "the data", "each column")


def render(fmt: str, fields: list[str], rows: list[list[str]], rng: random.Random) -> str:
    """The table in format `fmt` (lines joined by newlines)."""
    if fmt == "rows":
        sep = rng.choice((" - ", " | ", ", ", " / "))
        header = [sep.join(fields)] if rng.random() < 0.6 else []
        return "\n".join(header + [sep.join(row) for row in rows])
    if fmt == "inline":
        items = [f"{row[0]} ({', '.join(row[1:])})" for row in rows]
        return f"Columns {', '.join(fields[1:])}: " + "; ".join(items) + "."
    if fmt == "keyvalue":
        gap = rng.choice(("\n", "\n--\n"))
        blocks = ["\n".join(f"{f}: {v}" for f, v in zip(fields, row, strict=True)) for row in rows]
        return gap.join(blocks)
    if fmt == "sentences":
        out = []
        for row in rows:
            parts = [PHRASES[f].format(v=v) for f, v in zip(fields[1:], row[1:], strict=True)]
            out.append(f"{row[0]} {', '.join(parts[:-1])} and {parts[-1]}.")
        return "\n".join(out)
    if fmt == "pipes":
        lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    if fmt == "numbered":
        return "\n".join(
            f"{i}. {row[0]}: " + ", ".join(f"{f} {v}" for f, v in zip(fields[1:], row[1:]))
            for i, row in enumerate(rows, start=1)
        )
    raise ValueError(f"unknown table format {fmt!r}")


def draft(rng: random.Random, target_tokens: int) -> Draft:
    """A table of 3-6 records (fewer on short traces) placed in the first half of the
    thinking; one field of one record is asked."""
    size = rng.randint(3, max(3, min(6, target_tokens // 100)))
    fields = ["name"] + rng.sample(list(FIELDS), rng.randint(2, 4))
    columns = [rng.sample(PEOPLE, size)] + [rng.sample(FIELDS[f], size) for f in fields[1:]]
    rows = [list(row) for row in zip(*columns, strict=True)]
    fmt = rng.choice(FORMATS)
    table = f"{rng.choice(TABLE_LEADS)}\n{render(fmt, fields, rows, rng)}"
    row = rng.randrange(size)
    column = rng.randrange(1, len(fields))
    name, field = rows[row][0], fields[column]
    choices = FIELD_PREFIXES[field] + GENERIC_PREFIXES
    prefix = rng.choice(choices).format(n=name, f=field)
    return Draft(
        family="lookup",
        prompt=f"{rng.choice(INTROS)} {rng.choice(QUESTIONS).format(f=field, n=name)}",
        lines=[Line(table, (0.0, 0.5), labelled=False)],
        prefix=prefix,
        answer=rows[row][column],
        topics=TOPICS,
        record={"fields": fields, "rows": rows, "format": fmt, "row": row, "field": field},
        lead=rng.choice(ANSWER_LEADS),
    )


def make(
    tokenizer: Tokenizer, rng: random.Random, index: int, target_tokens: int, think_end: str
) -> CorpusProblem:
    """One lookup problem of about `target_tokens` tokens."""
    return grow(tokenizer, rng, draft(rng, target_tokens), index, target_tokens, think_end)
