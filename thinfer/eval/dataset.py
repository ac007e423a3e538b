"""Evaluation datasets: JSONL problems with reference answers, and their prompts.

Each line is a JSON object with the problem in `problem`, `question` or `prompt`, and the
reference in `answer` (a string or number) or in `solution` (its last `\\boxed{}`). A
multiple-choice problem (GPQA style) has `choices` (a list, lettered A, B, ... in order, or a
{letter: text} object) and `answer` (the letter, or the text of the right choice): its prompt
lists the choices and the expected answer is the letter. `id` is optional (default: the line
number).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from thinfer.eval.answers import choice_letter, extract_answer

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "The final answer is the letter of the correct choice."
PROBLEM_FIELDS = ("problem", "question", "prompt")


@dataclass
class Problem:
    """One problem: its text, reference answer and, for multiple choice, the options."""

    id: str
    question: str
    reference: str
    choices: list[tuple[str, str]] | None = None

    @property
    def is_choice(self) -> bool:
        """True for a multiple-choice problem (the reference is a letter)."""
        return self.choices is not None

    def prompt_text(self) -> str:
        """The user message: the problem, the lettered choices if any, the instruction."""
        parts = [self.question.strip()]
        if self.choices is not None:
            parts.append("\n".join(f"{letter}. {text}" for letter, text in self.choices))
            return "\n\n".join(parts) + f"\n\n{INSTRUCTION} {CHOICE_INSTRUCTION}"
        return "\n\n".join(parts) + f"\n\n{INSTRUCTION}"


def _choices(value: object, where: str) -> list[tuple[str, str]]:
    if isinstance(value, list) and value and all(isinstance(c, str | int | float) for c in value):
        if len(value) > len(string.ascii_uppercase):
            raise ValueError(f"{where}: at most 26 choices")
        return [(string.ascii_uppercase[i], str(c)) for i, c in enumerate(value)]
    if isinstance(value, dict) and value:
        pairs = []
        for key, text in value.items():
            letter = choice_letter(str(key))
            if letter is None or not isinstance(text, str | int | float):
                raise ValueError(f"{where}: 'choices' keys must be letters and values text")
            pairs.append((letter, str(text)))
        return pairs
    raise ValueError(f"{where}: 'choices' must be a non-empty list or a {{letter: text}} object")


def _choice_answer(value: object, choices: list[tuple[str, str]], where: str) -> str:
    text = str(value).strip() if isinstance(value, str | int | float) else ""
    for letter, choice in choices:
        if text == choice.strip():
            return letter
    letter = choice_letter(text) if text else None
    if letter is None or letter not in {c[0] for c in choices}:
        raise ValueError(f"{where}: 'answer' must be one of the choices' letters, got {value!r}")
    return letter


def parse_problem(record: object, number: int, where: str) -> Problem:
    """Build a Problem from one JSONL record; ValueError names `where` and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    field = next((f for f in PROBLEM_FIELDS if f in record), None)
    if field is None or not isinstance(record[field], str) or not record[field].strip():
        raise ValueError(f"{where}: needs a non-empty 'problem', 'question' or 'prompt' field")
    problem_id = str(record.get("id", number))
    if "choices" in record:
        choices = _choices(record["choices"], where)
        if "answer" not in record:
            raise ValueError(f"{where}: a multiple-choice problem needs an 'answer' letter")
        reference = _choice_answer(record["answer"], choices, where)
        return Problem(problem_id, record[field], reference, choices)
    answer = record.get("answer")
    if isinstance(answer, str | int | float) and not isinstance(answer, bool):
        reference = str(answer).strip()
        boxed = extract_answer(reference) if "\\boxed" in reference else None
        reference = boxed or reference
    elif isinstance(record.get("solution"), str):
        reference = extract_answer(record["solution"]) or ""
    else:
        reference = ""
    if not reference:
        raise ValueError(
            f"{where}: needs an 'answer' (string or number) or a 'solution' with a \\boxed{{}}"
        )
    return Problem(problem_id, record[field], reference)


def load_problems(path: str, limit: int | None = None) -> list[Problem]:
    """Read a JSONL dataset (the first `limit` problems); ValueError on bad input."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ValueError(f"--dataset: cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--dataset: {path} is not UTF-8 text") from e
    problems = []
    for number, line in lines:
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
        problems.append(parse_problem(record, number, where))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"--dataset: {path} has no problems")
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise ValueError(f"--dataset: {path}: duplicate id {problem.id!r}")
        seen.add(problem.id)
    return problems
