"""A corpus problem: a proxy problem (trace, answer prefix, answer) plus its family.

`CorpusProblem` extends `ProxyProblem`, so `is_correct` and the replay grading of
`thinfer.dynts.proxy_eval` take it unchanged. On disk it is the token-id trace JSONL of
`thinfer.dynts.traces` with extra keys, which `read_traces` ignores:

    {"id": "tracking-17", "prompt_token_ids": [...], "completion_token_ids": [...],
     "answer": "18", "family": "tracking", "answer_prefix_end": 512,
     "critical_spans": [[40, 58], ...], "record": {...}}

`critical_spans` are [start, end) completion-token ranges of the lines that state the critical
facts; `record` is the family's structured account of the facts (enough to recompute the
answer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from thinfer.dynts.proxy import ProxyProblem
from thinfer.dynts.traces import read_jsonl, trace_from_record


@dataclass
class CorpusProblem(ProxyProblem):
    """One corpus problem: the trace, where the graded answer starts, the answer, the family."""

    family: str = ""
    critical_spans: list[tuple[int, int]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The token-id trace record plus the corpus keys."""
        out = self.trace.to_json()
        out.update(
            family=self.family,
            answer_prefix_end=self.answer_prefix_end,
            critical_spans=[list(span) for span in self.critical_spans],
            record=self.record,
        )
        return out


def problem_from_record(record: dict[str, Any], line: int) -> CorpusProblem:
    """Parse one JSONL record written by `write_problems`; ValueError names the line."""
    trace = trace_from_record(record, None, line)
    where = f"problem line {line}"
    family = record.get("family")
    if not isinstance(family, str) or not family:
        raise ValueError(f"{where}: needs a non-empty 'family'")
    end = record.get("answer_prefix_end")
    if not isinstance(end, int) or isinstance(end, bool):
        raise ValueError(f"{where}: needs an integer 'answer_prefix_end'")
    if not 0 < end < len(trace.completion_token_ids):
        raise ValueError(f"{where}: answer_prefix_end {end} is outside the completion")
    if trace.answer is None:
        raise ValueError(f"{where}: needs an 'answer'")
    spans = record.get("critical_spans", [])
    if not isinstance(spans, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in spans
    ):
        raise ValueError(f"{where}: critical_spans must be a list of [start, end] pairs")
    extra = record.get("record", {})
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: 'record' must be an object")
    return CorpusProblem(trace, end, trace.answer, family, [(s[0], s[1]) for s in spans], extra)


def write_problems(path: str, problems: Iterable[CorpusProblem]) -> None:
    """Write problems as token-id trace JSONL with the corpus keys."""
    with open(path, "w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_json()) + "\n")


def read_problems(path: str, families: Iterable[str] | None = None) -> list[CorpusProblem]:
    """The problems of a corpus JSONL file (blank lines skipped), in file order; only those of
    `families` when given."""
    wanted = None if families is None else set(families)
    problems = []
    for number, record in read_jsonl(path, "problem"):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: problem line {number}: expected a JSON object")
        problem = problem_from_record(record, number)
        if wanted is None or problem.family in wanted:
            problems.append(problem)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def split_by_family(
    problems: Iterable[CorpusProblem], held_out_family: str
) -> tuple[list[CorpusProblem], list[CorpusProblem]]:
    """(train, held_out): every problem of `held_out_family` goes to held_out, every other one
    to train, each in the given order. ValueError when no problem has that family."""
    train: list[CorpusProblem] = []
    held_out: list[CorpusProblem] = []
    for problem in problems:
        (held_out if problem.family == held_out_family else train).append(problem)
    if not held_out:
        raise ValueError(f"no problem of family {held_out_family!r} to hold out")
    return train, held_out
