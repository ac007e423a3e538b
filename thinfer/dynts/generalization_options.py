"""The options of `thinfer dynts generalization`, checked before any model loads, and what a
resumed run takes over from the record of an earlier one."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinfer.dynts.corpus.problem import CorpusProblem

# The record fields a resumed run must share with the earlier one: families measured under
# other settings cannot sit in one table.
SETTINGS = (
    "model", "corpus_sha256", "count", "budget_fractions", "window", "ratio", "trigger",
    "scoring", "methods", "think_end", "training",
)  # fmt: skip


def parse_names(text: str) -> list[str]:
    """The comma-separated names of `text`, blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_fractions(text: str) -> list[float]:
    """Budget fractions of a comma-separated list; ValueError outside (0, 1] or repeated."""
    try:
        fractions = [float(x) for x in parse_names(text)]
    except ValueError as e:
        raise ValueError(f"--budgets must be comma-separated numbers, got {text!r}") from e
    if not fractions:
        raise ValueError("--budgets is empty")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--budgets: fractions must be in (0, 1], got {bad[0]}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"--budgets: a fraction is listed twice: {text}")
    return fractions


def check_methods(methods: Sequence[str]) -> list[str]:
    """`methods` with `full` first (the reference); ValueError for an unknown or repeated one."""
    from thinfer.compression.config import all_method_names

    known = all_method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {', '.join(methods)}")
    return ["full"] + [m for m in methods if m != "full"]


def by_family(problems: Sequence[CorpusProblem]) -> dict[str, list[CorpusProblem]]:
    """The problems of each family, families and problems in file order."""
    out: dict[str, list[CorpusProblem]] = {}
    for problem in problems:
        out.setdefault(problem.family, []).append(problem)
    return out


def select_families(
    problems: Sequence[CorpusProblem], requested: Sequence[str] | None
) -> list[str]:
    """The families to hold out in turn (all of the corpus when None). ValueError when the
    corpus has fewer than two families or a requested one is not in it."""
    present = list(by_family(problems))
    if len(present) < 2:
        raise ValueError(
            f"the corpus has {len(present)} famil{'y' if len(present) == 1 else 'ies'} "
            f"({', '.join(present)}); leave-one-family-out needs at least two"
        )
    if requested is None:
        return present
    missing = [f for f in requested if f not in present]
    if missing:
        raise ValueError(f"family {', '.join(missing)} not in the corpus ({', '.join(present)})")
    if not requested or len(set(requested)) != len(requested):
        raise ValueError(f"--families must name distinct families, got {', '.join(requested)}")
    return list(requested)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (the corpus a record was measured on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def previous_families(path: str, record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """For `--resume`: the families an earlier run already wrote to `path`, every one of them
    (a run over other `--families` adds to the record, it never drops what is in it), and the
    families that run held out, in its order; ({}, []) when there is no file. ValueError
    naming the fields when that run used other settings."""
    if not os.path.exists(path):
        return {}, []
    try:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: cannot read {path}: {e}") from e
    as_json = json.loads(json.dumps({key: record[key] for key in SETTINGS}))  # tuples: lists
    differ = [key for key in SETTINGS if earlier.get(key) != as_json[key]]
    if differ:
        raise ValueError(
            f"--resume: {path} was measured with other {', '.join(differ)}; "
            "give another --output-dir or the same options"
        )
    measured = earlier.get("families", {})
    held_out = list(earlier.get("held_out_families", []))
    return measured, held_out + [f for f in measured if f not in held_out]
