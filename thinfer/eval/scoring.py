"""Scoring an evaluation: per-sample correctness, Pass@1, pass@k, lengths and peak KV.

Pass@1 is the DynTS protocol's: for each problem the mean accuracy over its k samples, then
the mean over problems. pass@k uses the unbiased estimator of Chen et al. (2021),
`1 - C(n - c, k) / C(n, k)` for n samples of which c are correct; with n = k it is 1 when any
sample is correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from thinfer.eval.answers import answers_equal, choice_letter, extract_answer
from thinfer.eval.dataset import Problem


@dataclass
class Sample:
    """One generated sample of one problem under one method."""

    text: str
    num_tokens: int
    finish_reason: str | None
    peak_kv: int
    token_ids: list[int] = field(default_factory=list)  # the generated tokens


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples with c correct (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


class Grader:
    """Extracts answers and checks them, remembering checks already made."""

    def __init__(self, pattern: str | None = None, timeout: float = 2.0) -> None:
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.timeout = timeout
        self._cache: dict[tuple[str, str, bool], bool] = {}

    def grade(self, problem: Problem, text: str) -> tuple[str | None, bool]:
        """(extracted answer, correct?) of one output."""
        answer = extract_answer(text, self.pattern)
        if answer is None:
            return None, False
        key = (answer, problem.reference, problem.is_choice)
        if key not in self._cache:
            if problem.is_choice:
                self._cache[key] = choice_letter(answer) == problem.reference
            else:
                self._cache[key] = answers_equal(answer, problem.reference, self.timeout)
        return answer, self._cache[key]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score_method(
    problems: list[Problem],
    samples: list[list[Sample]],
    prompt_lens: list[int],
    grader: Grader,
    keep_text: bool = False,
) -> dict[str, Any]:
    """Summary and per-problem details of one method's samples (`samples[i]`: problem i's)."""
    details = []
    accuracies, passes, lengths, peaks = [], [], [], []
    finish: dict[str, int] = {}
    for problem, outs, prompt_len in zip(problems, samples, prompt_lens, strict=True):
        rows = []
        correct = 0
        for sample in outs:
            answer, ok = grader.grade(problem, sample.text)
            correct += ok
            lengths.append(sample.num_tokens)
            peaks.append(sample.peak_kv)
            reason = sample.finish_reason or "unknown"
            finish[reason] = finish.get(reason, 0) + 1
            row: dict[str, Any] = {
                "answer": answer,
                "correct": ok,
                "generated_tokens": sample.num_tokens,
                "peak_kv": sample.peak_kv,
                "finish_reason": sample.finish_reason,
            }
            if keep_text:
                row["text"] = sample.text
            rows.append(row)
        n = len(outs)
        accuracies.append(correct / n)
        passes.append(pass_at_k(n, correct, n))
        details.append(
            {
                "id": problem.id,
                "reference": problem.reference,
                "prompt_tokens": prompt_len,
                "num_correct": correct,
                "accuracy": correct / n,
                "pass_at_k": passes[-1],
                "samples": rows,
            }
        )
    return {
        "pass_at_1": _mean(accuracies),
        "pass_at_k": _mean(passes),
        "mean_generated_tokens": _mean(lengths),
        "mean_peak_kv": _mean(peaks),
        "max_peak_kv": max(peaks) if peaks else 0,
        "finish_reasons": finish,
        "problems": details,
    }
