"""Which critical tokens a ranking keeps to the answer under the uniform schedule, offline.

A replay says whether the answer came out right; this says why not. For one labelled corpus
trace and one score per token, `kept_positions` plays the uniform rule of
`thinfer.compression.schedule` over the trace without running the model: the prompt is in the
cache, each completion token joins it, and whenever the cache holds `budget` slots it keeps the
`window` newest plus the top floor(ratio * (L - window)) older ones by score, with the
engine's own rules (`uniform_rule`, `keep_mask`: ties go to the older token), until the graded
answer is about to be generated. The prompt, `</think>` and the answer tokens score +inf, as
DynTS gives them. `critical_kept` is the share of the trace's
critical-span tokens (the lines that state the facts) still cached then.

Ranking by the true labels (the answer's own attention, known only after the fact) keeps
what a perfect importance head would keep at that budget; ranking by position (newest first)
is a recent window with the prompt kept. A head between the two is as good as its ranking of
the few tokens the answer needs, which the top-20% overlap only hints at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from thinfer.compression.compaction import keep_mask
from thinfer.compression.schedule import uniform_rule
from thinfer.dynts.corpus.problem import CorpusProblem

RANKINGS = ("head", "labels", "recent")


def kept_positions(
    scores: torch.Tensor, prompt_len: int, stop: int, budget: int, window: int, ratio: float
) -> set[int]:
    """Positions cached when position `stop` is about to be written, under the uniform rule
    (`schedule.uniform_rule`) and the engine's keep rule (`compaction.keep_mask`) with
    `scores[p]` ranking position p (the prompt is never evicted)."""
    if not 0 <= window < budget:
        raise ValueError(f"window must be in [0, budget={budget}), got {window}")
    cache = torch.arange(min(prompt_len, stop))
    for position in range(prompt_len, stop):
        cache = torch.cat([cache, torch.tensor([position])])
        rule = uniform_rule(cache.numel(), budget, window, ratio)
        if rule is not None:
            recent, older = rule
            protected = cache < prompt_len
            cache = cache[keep_mask(scores[cache].double(), cache, protected, recent, older)]
    return set(cache.tolist())


def critical_kept(
    problem: CorpusProblem, scores: torch.Tensor, budget: int, window: int, ratio: float
) -> float | None:
    """Share of `problem`'s critical-span tokens cached when its graded answer starts (None
    when it has no critical span). `scores` covers the whole trace, prompt first."""
    prompt_len = len(problem.trace.prompt_token_ids)
    critical = [prompt_len + t for start, end in problem.critical_spans for t in range(start, end)]
    if not critical:
        return None
    stop = prompt_len + problem.answer_prefix_end
    if scores.numel() != len(problem.trace.token_ids):
        raise ValueError(
            f"trace {problem.trace.id}: {scores.numel()} scores for "
            f"{len(problem.trace.token_ids)} tokens (labels of another corpus?)"
        )
    kept = kept_positions(scores, prompt_len, stop, budget, window, ratio)
    return sum(p in kept for p in critical) / len(critical)


def ranking_scores(
    ranking: str, entry: dict, head_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores of one labelled trace (`entry` of a features file) under `ranking`: the head's
    (given as `head_scores` on the thinking tokens), the true labels, or the position.
    Everything past the thinking (`</think>` and the answer) scores +inf."""
    total = entry["labels"].numel()
    mask = entry["thinking_mask"]
    if ranking == "head":
        if head_scores is None:
            raise ValueError("the head ranking needs head_scores")
        scores = torch.zeros(total, dtype=torch.float64)
        scores[mask] = head_scores.double()
    elif ranking == "labels":
        scores = entry["labels"].double().clone()
    elif ranking == "recent":
        scores = torch.arange(total, dtype=torch.float64)
    else:
        raise ValueError(f"unknown ranking {ranking!r}; expected one of {', '.join(RANKINGS)}")
    thinking = mask.nonzero()
    after = int(thinking[-1]) + 1 if thinking.numel() else entry["prompt_len"]
    scores[after:] = math.inf
    return scores


def mean_kept(
    problems: Sequence[CorpusProblem],
    scores: Sequence[torch.Tensor],
    budget: int,
    window: int,
    ratio: float,
) -> float | None:
    """Mean `critical_kept` over the problems that have critical spans (None when none)."""
    shares = [
        share
        for problem, s in zip(problems, scores, strict=True)
        if (share := critical_kept(problem, s, budget, window, ratio)) is not None
    ]
    return sum(shares) / len(shares) if shares else None


def family_critical_kept(
    head: torch.nn.Module,
    features: dict,
    problems: Sequence[CorpusProblem],
    budgets: dict[str, int],
    window: int,
    ratio: float,
) -> dict[str, dict[str, float | int | None]]:
    """Per budget (key: its fraction as text, value: slots), the mean share of critical
    tokens kept to the answer under each ranking, over the `problems` that were labelled
    (`features` entries matched by trace id)."""
    from thinfer.dynts.train import predict

    entries = {str(e["id"]): e for e in features["traces"]}
    labelled = [p for p in problems if p.trace.id in entries]
    scores: dict[str, list[torch.Tensor]] = {r: [] for r in RANKINGS}
    with torch.no_grad():
        for problem in labelled:
            entry = entries[problem.trace.id]
            predicted = predict(head, entry["hidden"][entry["thinking_mask"]].float())
            for ranking in RANKINGS:
                scores[ranking].append(ranking_scores(ranking, entry, predicted))
    out: dict[str, dict[str, float | int | None]] = {}
    for key, budget in budgets.items():
        cell: dict[str, float | int | None] = {"budget": budget, "problems": len(labelled)}
        for ranking in RANKINGS:
            cell[ranking] = mean_kept(labelled, scores[ranking], budget, window, ratio)
        out[key] = cell
    return out
