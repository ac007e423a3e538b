"""Real English text without a download, and how it is cut into token windows.

The default source is the CPython documentation topics that ship with every Python
(`pydoc_data.topics.topics`: the `help("if")`, `help("with")`, ... pages, several hundred KB
of prose and examples written by people). Perplexity (`thinfer eval ppl`) and the calibration
of structured pruning share it: `split_tokens` keeps the last share of the tokens for
evaluation and gives the rest to calibration, so the two never overlap.
"""

from __future__ import annotations

import glob
import os

DEFAULT_SOURCE = "pydoc_data.topics"
DEFAULT_HELD_OUT = 0.2


def default_text() -> str:
    """The Python documentation topics, in sorted key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def text_paths(paths: list[str]) -> list[str]:
    """The files named by `paths` (files, directories of *.txt, or glob patterns), sorted,
    without duplicates. ValueError naming the path that does not exist or finds nothing."""
    if not paths:
        raise ValueError("no text paths given")
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            matches = sorted(glob.glob(os.path.join(path, "*.txt")))
            if not matches:
                raise ValueError(f"{path}: directory holds no *.txt files")
            found += matches
        elif os.path.isfile(path):
            found.append(path)
        else:
            matches = [m for m in sorted(glob.glob(path)) if os.path.isfile(m)]
            if not matches:
                raise ValueError(f"{path}: no such file, directory or matching pattern")
            found += matches
    return sorted(set(found))


def read_texts(paths: list[str]) -> str:
    """The text of the files named by `paths` (see `text_paths`), read as UTF-8 with bad bytes
    replaced, in sorted path order, separated by blank lines."""
    parts = []
    for path in text_paths(paths):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read().strip())
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from e
    text = "\n\n".join(p for p in parts if p)
    if not text:
        raise ValueError(f"no text in {', '.join(paths)}")
    return text


def split_tokens(
    token_ids: list[int], held_out_fraction: float = DEFAULT_HELD_OUT
) -> tuple[list[int], list[int]]:
    """(calibration, evaluation): evaluation is the last `held_out_fraction` of the tokens
    (rounded down), calibration everything before it; they never overlap."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    cut = len(token_ids) - int(len(token_ids) * held_out_fraction)
    return list(token_ids[:cut]), list(token_ids[cut:])


def windows(token_ids: list[int], length: int, count: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of exactly `length` tokens from the start of
    `token_ids` (the remainder is dropped), at most `count` of them."""
    if length < 2:
        raise ValueError(f"window length must be >= 2 (one token predicts the next), got {length}")
    if count is not None and count < 1:
        raise ValueError(f"window count must be >= 1, got {count}")
    available = len(token_ids) // length
    if available == 0:
        raise ValueError(
            f"not even one window fits: {len(token_ids)} tokens, a window needs {length}"
        )
    n = available if count is None else min(count, available)
    return [list(token_ids[i * length : (i + 1) * length]) for i in range(n)]
