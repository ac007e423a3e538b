"""From a family's draft (prompt, critical lines, question) to a tokenized corpus problem.

A family writes a `Draft`: the prompt, the critical lines in order (each with the zone of the
thinking, as fractions, where it may land), the answer prefix and the answer. `grow` adds
filler lines until the trace reaches its token target, scatters the critical lines among them
(order kept, each inside its zone), labels the lines in one step-label style, and tokenizes.

The completion is tokenized piece by piece ("<think>\\n", each line with its newline, the
think-end marker, "\\n" + the answer prefix, " answer."), so the token spans of the critical
lines are known exactly. Pieces join where the text would split anyway (before a word or after
a newline), so the ids match a tokenization of the whole text except where an indented line
follows a newline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.corpus.wording import LABEL_STYLES, filler_line, step_label
from thinfer.dynts.traces import Trace
from thinfer.loading.tokenizer import Tokenizer

THINK_START = "<think>\n"
# Rough token cost of one step label per style (exact counts are not needed: the target is
# only approximate).
LABEL_TOKENS = {
    "step": 5, "step_dot": 5, "paren": 3, "dot": 3, "dash": 1, "bullet": 1, "ordinal": 2,
    "none": 0,
}  # fmt: skip


@dataclass
class Line:
    """A critical line (or a multi-line block) and where in the thinking it may land."""

    text: str
    # Fractions of the filler before the line; neither bound may decrease from line to line.
    zone: tuple[float, float] = (0.0, 1.0)
    labelled: bool = True  # False: no step label (a table block)


@dataclass
class Draft:
    """What a family writes before the filler goes in."""

    family: str
    prompt: str
    lines: list[Line]
    prefix: str  # the answer prefix, forced when grading ("Mara's locker number is")
    answer: str  # one word or number, completed as " answer."
    topics: tuple[str, ...]  # what the filler talks about
    record: dict[str, Any] = field(default_factory=dict)
    lead: str = ""  # text between the marker and the prefix ("Answer: ")


def encode_problem(
    tokenizer: Tokenizer,
    draft: Draft,
    index: int,
    pieces: list[str],
    critical: set[int],
    think_end: str,
) -> CorpusProblem:
    """The problem whose thinking is `pieces` (each ending with its newline); the pieces at
    the indices `critical` are the critical spans."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prompt_ids = tokenizer.encode(draft.prompt + "\n")
    completion = encode(THINK_START)
    spans = []
    for i, piece in enumerate(pieces):
        start = len(completion)
        completion += encode(piece)
        if i in critical:
            spans.append((start, len(completion)))
    completion += encode(think_end)
    completion += encode("\n" + draft.lead + draft.prefix)
    prefix_end = len(completion)
    completion += encode(f" {draft.answer}.")
    trace = Trace(f"{draft.family}-{index}", prompt_ids, completion, draft.answer)
    return CorpusProblem(trace, prefix_end, draft.answer, draft.family, spans, draft.record)


def place(num_fillers: int, lines: list[Line], rng: random.Random) -> list[int]:
    """For each critical line, the number of filler lines before it: a random point in its
    zone, sorted so the order is kept (with monotone zones every line stays in its zone)."""
    points = sorted(rng.uniform(*line.zone) for line in lines)
    return [min(num_fillers, int(p * (num_fillers + 1))) for p in points]


def grow(
    tokenizer: Tokenizer,
    rng: random.Random,
    draft: Draft,
    index: int,
    target_tokens: int,
    think_end: str,
) -> CorpusProblem:
    """The problem of `draft` with filler added until about `target_tokens` tokens (prompt and
    completion); critical lines scattered in their zones, all lines labelled in one style."""
    style = rng.choice(LABEL_STYLES)

    def cost(text: str, labelled: bool = True) -> int:
        label = LABEL_TOKENS[style] if labelled else 0
        return len(tokenizer.encode(text + "\n", add_special_tokens=False)) + label

    total = len(tokenizer.encode(draft.prompt + "\n")) + cost(THINK_START, False)
    total += sum(cost(line.text, line.labelled) for line in draft.lines)
    tail = f"{think_end}\n{draft.lead}{draft.prefix} {draft.answer}."
    total += len(tokenizer.encode(tail, add_special_tokens=False))
    fillers = []
    while total < target_tokens:
        fillers.append(filler_line(rng, draft.topics))
        total += cost(fillers[-1])
    slots = place(len(fillers), draft.lines, rng)
    ordered: list[tuple[str, bool, bool]] = []  # text, critical, labelled
    critical_iter = iter(zip(slots, draft.lines, strict=True))
    pending = next(critical_iter, None)
    for position in range(len(fillers) + 1):
        while pending is not None and pending[0] == position:
            ordered.append((pending[1].text, True, pending[1].labelled))
            pending = next(critical_iter, None)
        if position < len(fillers):
            ordered.append((fillers[position], False, True))
    pieces, critical, number = [], set(), 0
    for text, is_critical, labelled in ordered:
        label = ""
        if labelled:
            number += 1
            label = step_label(style, number, rng)
        if is_critical:
            critical.add(len(pieces))
        pieces.append(f"{label}{text}\n")
    draft.record.setdefault("label_style", style)
    return encode_problem(tokenizer, draft, index, pieces, critical, think_end)
