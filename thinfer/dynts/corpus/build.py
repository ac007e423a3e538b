"""The corpus: `count` problems of each requested family, reproducible from one seed.

Each family draws from its own random stream, `random.Random(f"{seed}:{family}")` (string
seeds are hashed with SHA-512, so the stream is the same in every process), so a family's
problems do not change when other families are added to or removed from a request, and the
first n problems of a family are the same for every count >= n. Trace ids are
"{family}-{index}". Each trace's length (prompt and completion) is drawn uniformly within
±30% of `target_tokens`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from thinfer.dynts.corpus import arithmetic, codes, lookup, recall, text, tracking
from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.traces import DEFAULT_THINK_END
from thinfer.loading.tokenizer import Tokenizer

Generator = Callable[[Tokenizer, random.Random, int, int, str], CorpusProblem]
FAMILIES: dict[str, Generator] = {
    "recall": recall.make,
    "tracking": tracking.make,
    "arithmetic": arithmetic.make,
    "lookup": lookup.make,
    "text": text.make,
    "codes": codes.make,
}
MIN_TOKENS: dict[str, int] = {
    "recall": recall.MIN_TOKENS,
    "tracking": tracking.MIN_TOKENS,
    "arithmetic": arithmetic.MIN_TOKENS,
    "lookup": lookup.MIN_TOKENS,
    "text": text.MIN_TOKENS,
    "codes": codes.MIN_TOKENS,
}
DEFAULT_TARGET_TOKENS = 650
SPREAD = 0.3  # lengths vary within ±30% of the target


def check_request(families: Sequence[str] | None, count: int, target_tokens: int) -> list[str]:
    """The family names to build (all when None), in the given order. ValueError for an
    unknown or repeated family, `count` < 1, or a target too small for a family's facts."""
    names = list(FAMILIES) if families is None else list(families)
    if not names:
        raise ValueError("no families requested")
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(
            f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
            f"known: {', '.join(FAMILIES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"a family is listed twice: {', '.join(names)}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    for name in names:
        needed = round(MIN_TOKENS[name] / (1 - SPREAD))
        if target_tokens < needed:
            raise ValueError(
                f"target tokens {target_tokens} are too few to hold the facts of family "
                f"{name!r} (needs >= {needed})"
            )
    return names


def make_corpus(
    tokenizer: Tokenizer,
    families: Sequence[str] | None,
    count: int,
    seed: int,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    think_end: str = DEFAULT_THINK_END,
) -> list[CorpusProblem]:
    """`count` problems of each family (all when None), family by family in the given order."""
    problems = []
    for name in check_request(families, count, target_tokens):
        rng = random.Random(f"{seed}:{name}")
        for index in range(count):
            target = round(target_tokens * rng.uniform(1 - SPREAD, 1 + SPREAD))
            problems.append(FAMILIES[name](tokenizer, rng, index, target, think_end))
    return problems
