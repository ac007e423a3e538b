"""The offline uniform schedule of `thinfer.dynts.survival`: which positions stay cached, and
the share of critical tokens each ranking keeps to the answer (no model needed)."""

import math

import pytest
import torch

from thinfer.dynts.corpus.problem import CorpusProblem
from thinfer.dynts.survival import critical_kept, kept_positions, mean_kept, ranking_scores
from thinfer.dynts.traces import Trace


def test_a_budget_never_reached_keeps_everything():
    scores = torch.rand(20)
    assert kept_positions(scores, 3, 15, budget=16, window=4, ratio=0.3) == set(range(15))


def test_the_rule_keeps_prompt_window_and_the_best_older_by_score():
    # prompt 2, then positions 2..11; budget 8, window 3, ratio 0.5
    scores = torch.zeros(12)
    scores[3] = 5.0  # the one high-scoring thinking token
    kept = kept_positions(scores, 2, 12, budget=8, window=3, ratio=0.5)
    # first compression at 8 slots (positions 0..7): keep 3 recent (5,6,7) and
    # floor(0.5 * 5) = 2 older: the prompt (+inf) beats position 3, so 3 is evicted
    assert 3 not in kept and {0, 1} <= kept
    scores[:2] = -1.0  # the prompt is protected whatever it scores
    assert {0, 1} <= kept_positions(scores, 2, 12, budget=8, window=3, ratio=0.5)
    roomier = kept_positions(scores, 2, 12, budget=8, window=3, ratio=0.7)
    assert 3 in roomier  # floor(0.7 * 5) = 3 older slots: prompt + position 3
    # the cache never holds more than the budget
    for stop in range(2, 12):
        assert len(kept_positions(scores, 2, stop, budget=8, window=3, ratio=0.5)) < 8


def test_ties_go_to_the_older_token_as_in_the_engine():
    kept = kept_positions(torch.zeros(10), 0, 6, budget=6, window=2, ratio=0.5)
    # at 6 slots keep 2 recent (4, 5) and 2 older of 0..3, all tied: keep_mask evicts the
    # newest tied first, so 0 and 1 stay
    assert {0, 1, 4, 5} <= kept and not {2, 3} & kept


def problem(prompt_len: int, completion_len: int, spans, answer_prefix_end: int) -> CorpusProblem:
    trace = Trace(
        id="t-0",
        prompt_token_ids=list(range(prompt_len)),
        completion_token_ids=list(range(completion_len)),
        answer="1",
    )
    return CorpusProblem(trace, answer_prefix_end, "1", "t", spans, {})


def entry_for(p: CorpusProblem, think_end: int) -> dict:
    total, start = len(p.trace.token_ids), len(p.trace.prompt_token_ids)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[start : start + think_end] = True
    labels = torch.full((total,), 0.01)
    for a, b in p.critical_spans:
        labels[start + a : start + b] = 1.0  # the answer reads the critical tokens
    return {"prompt_len": start, "labels": labels, "thinking_mask": mask}


def test_labels_keep_the_critical_tokens_recency_does_not():
    p = problem(prompt_len=4, completion_len=60, spans=[(2, 5)], answer_prefix_end=55)
    entry = entry_for(p, think_end=50)
    labels = ranking_scores("labels", entry)
    recent = ranking_scores("recent", entry)
    assert math.isinf(labels[4 + 50]) and math.isinf(recent[-1])  # past the thinking
    assert critical_kept(p, labels, budget=20, window=5, ratio=0.5) == 1.0
    assert critical_kept(p, recent, budget=20, window=5, ratio=0.5) == 0.0
    head = ranking_scores("head", entry, head_scores=entry["labels"][entry["thinking_mask"]])
    assert torch.equal(head[4:54], labels[4:54])
    assert mean_kept([p, p], [labels, recent], budget=20, window=5, ratio=0.5) == 0.5
    no_spans = problem(prompt_len=4, completion_len=60, spans=[], answer_prefix_end=55)
    assert critical_kept(no_spans, labels, budget=20, window=5, ratio=0.5) is None


def test_bad_input_is_named():
    p = problem(prompt_len=4, completion_len=60, spans=[(2, 5)], answer_prefix_end=55)
    entry = entry_for(p, think_end=50)
    with pytest.raises(ValueError, match="63 scores for 64 tokens"):
        critical_kept(p, torch.zeros(63), budget=20, window=5, ratio=0.5)
    with pytest.raises(ValueError, match="window must be in"):
        kept_positions(torch.zeros(10), 0, 10, budget=4, window=4, ratio=0.5)
    with pytest.raises(ValueError, match="unknown ranking 'attention'"):
        ranking_scores("attention", entry)
    with pytest.raises(ValueError, match="needs head_scores"):
        ranking_scores("head", entry)
