"""Token sampling: logits of one decoding step -> one token per sequence.

Per row, in the order HF/vLLM use: log-probs are read from the raw logits; banned ids are
masked to -inf; repetition penalty (HF rule); greedy rows take the argmax; the other rows are
divided by their temperature, filtered by top-k, top-p and min-p, and a token is drawn from
what is left with the row's own generator.

Filters keep ties: top-k keeps every token whose logit is >= the k-th largest logit, top-p
keeps every token whose probability is >= that of the last token of the smallest
most-probable prefix reaching `top_p`, min-p keeps tokens with `p >= min_p * p_max`.

The draw is inverse-CDF sampling: each row takes one float64 uniform from its own generator
(on the generator's device, so CPU generators work with GPU logits) and picks the first
token whose cumulative (unnormalised) probability reaches it. Zero-probability tokens are
never picked, and a row's token depends only on its own logits, parameters and generator.
All work is vectorised over the batch; only the uniform draws are per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from thinfer.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """Per-sequence input to the sampler for one step."""

    params: SamplingParams
    generator: torch.Generator | None  # the sequence's own RNG (None only when greedy)
    seen_token_ids: list[int]  # prompt + generated tokens so far (repetition penalty)
    banned_token_ids: list[int]  # masked to -inf this step (EOS/stop ids below min_tokens)


@dataclass
class SampledToken:
    """The token chosen for one row, with its log-probabilities when requested."""

    token_id: int
    logprob: float | None  # chosen token's log-prob under the raw model distribution
    top_logprobs: dict[int, float] | None  # params.logprobs most likely tokens + the chosen one


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
    """Choose one token per row of `logits` ([B, V], any float dtype) for `rows` (len B).

    Raises ValueError when a sampling row (temperature > 0) has no generator, when the
    shapes disagree, or when a row has no token left (all logits -inf or NaN).
    """
    _check_shape(logits, rows)
    for i, row in enumerate(rows):
        if not row.params.greedy and row.generator is None:
            raise ValueError(f"row {i}: temperature > 0 needs a generator")
    if not rows:
        return []
    x = logits.to(torch.float32, copy=True)
    lp_idx = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(_rows(x, lp_idx), dim=-1) if lp_idx else None

    greedy_idx, sample_idx = _process(x, rows)
    tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)
    bad = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
    if greedy_idx:
        xg = _rows(x, greedy_idx)
        best = xg.argmax(dim=-1, keepdim=True)  # ties -> lowest index
        tokens[greedy_idx] = best.squeeze(1)
        bad[greedy_idx] = ~torch.isfinite(xg.gather(1, best).squeeze(1))
    if sample_idx:
        drawn, ok = _draw(_rows(x, sample_idx), [rows[i].generator for i in sample_idx])
        tokens[sample_idx] = drawn
        bad[sample_idx] = ~ok
    token_list = tokens.tolist()
    if bool(bad.any()):
        rows_bad = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"rows {rows_bad}: no token left to sample (all -inf or NaN)")

    out = [SampledToken(t, None, None) for t in token_list]
    if raw_logprobs is not None:
        _fill_logprobs(out, raw_logprobs, lp_idx, rows, tokens)
    return out


def processed_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution `sample` draws from, per row ([B, V] float32).

    Greedy rows give a one-hot vector on their argmax. No generator is used or needed.
    """
    _check_shape(logits, rows)
    x = logits.to(torch.float32, copy=True)
    if not rows:
        return x
    greedy_idx, sample_idx = _process(x, rows)
    probs = torch.zeros_like(x)
    if greedy_idx:
        best = x[greedy_idx].argmax(dim=-1, keepdim=True)
        probs[greedy_idx] = torch.zeros_like(x[greedy_idx]).scatter_(1, best, 1.0)
    if sample_idx:
        probs[sample_idx] = torch.softmax(x[sample_idx], dim=-1)
    return probs


# ----- processing ---------------------------------------------------------------------------
def _check_shape(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {list(logits.shape)}")


def _process(x: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[int]]:
    """Apply bans, repetition penalty, temperature and filters to `x` in place.

    Returns (greedy row indices, sampling row indices). Greedy rows only get bans and the
    repetition penalty.
    """
    vocab = x.shape[1]
    _mask_ids(x, [row.banned_token_ids for row in rows], None)
    penalties = [row.params.repetition_penalty for row in rows]
    if any(p != 1.0 for p in penalties):
        _mask_ids(
            x,
            [row.seen_token_ids if p != 1.0 else [] for row, p in zip(rows, penalties)],
            penalties,
        )

    greedy_idx = [i for i, row in enumerate(rows) if row.params.greedy]
    sample_idx = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not sample_idx:
        return greedy_idx, sample_idx
    params = [rows[i].params for i in sample_idx]
    whole = len(sample_idx) == len(rows)
    xs = x if whole else x[sample_idx]

    temps = [p.temperature for p in params]
    if all(t == temps[0] for t in temps):
        if temps[0] != 1.0:
            xs.div_(temps[0])
    else:
        xs.div_(_column(temps, xs))

    top_k = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if top_k:
        _apply(xs, top_k, [params[i].top_k for i in top_k], _top_k)
    top_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if top_p:
        all_k = set(top_p) <= set(top_k)
        _apply(
            xs, top_p, [params[i].top_p for i in top_p], lambda t, v: _top_p(t, v, truncate=all_k)
        )
    min_p = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if min_p:
        _apply(xs, min_p, [math.log(params[i].min_p) for i in min_p], _min_p)

    if not whole:
        x[sample_idx] = xs
    return greedy_idx, sample_idx


def _rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` of `x`: `x` itself (no copy) when `idx` is every row."""
    return x if len(idx) == x.shape[0] else x[idx]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).unsqueeze(1)


def _mask_ids(x: torch.Tensor, ids: list[list[int]], penalties: list[float] | None) -> None:
    """Penalise (HF rule) or, when `penalties` is None, ban the given ids of each row."""
    if not any(ids):
        return
    counts = torch.tensor([len(r) for r in ids])
    row_idx = torch.repeat_interleave(torch.arange(len(ids)), counts)
    col_idx = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
    keep = (col_idx >= 0) & (col_idx < x.shape[1])  # ids outside the output vocab: ignored
    row_idx, col_idx = row_idx[keep].to(x.device), col_idx[keep].to(x.device)
    if penalties is None:
        x[row_idx, col_idx] = float("-inf")
        return
    pen = torch.tensor(penalties, dtype=torch.float32, device=x.device)[row_idx]
    vals = x[row_idx, col_idx]  # duplicates read the same value and write the same result
    x[row_idx, col_idx] = torch.where(vals > 0, vals / pen, vals * pen)


def _apply(
    xs: torch.Tensor,
    idx: list[int],
    values: list[Any],
    fn: Callable[[torch.Tensor, list[Any]], None],
) -> None:
    """Run the in-place filter `fn(sub, per_row_values)` on rows `idx` of `xs`."""
    if len(idx) == xs.shape[0]:
        fn(xs, values)
    else:
        sub = xs[idx]
        fn(sub, values)
        xs[idx] = sub


def _top_k(xs: torch.Tensor, ks: list[int]) -> None:
    top = torch.topk(xs, max(ks), dim=-1).values
    kcol = torch.tensor(ks, device=xs.device).unsqueeze(1) - 1
    xs.masked_fill_(xs < top.gather(1, kcol), float("-inf"))


def _top_p(xs: torch.Tensor, ps: list[float], truncate: bool) -> None:
    if truncate:  # top-k already ran on every row: only the finite entries matter
        m = int((xs > float("-inf")).sum(dim=-1).max())
        ordered = torch.topk(xs, max(m, 1), dim=-1).values
    else:
        ordered = torch.sort(xs, dim=-1, descending=True).values
    # Unnormalised masses and a sequential prefix sum: a row's decision does not depend on
    # how many -inf entries trail it (batch composition), as a softmax reduction would.
    mass = torch.exp(ordered - ordered[:, :1])
    cum = torch.cumsum(mass, dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    n_keep = (before < _column(ps, xs) * cum[:, -1:]).sum(dim=-1, keepdim=True).clamp_(min=1)
    xs.masked_fill_(xs < ordered.gather(1, n_keep - 1), float("-inf"))


def _min_p(xs: torch.Tensor, log_min_p: list[float]) -> None:
    top = xs.max(dim=-1, keepdim=True).values
    xs.masked_fill_(xs - top < _column(log_min_p, xs), float("-inf"))


# ----- drawing and log-probs ----------------------------------------------------------------
def _draw(
    xs: torch.Tensor, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw per row, overwriting `xs`; returns (token ids, row-has-a-token flags)."""
    top = xs.max(dim=-1, keepdim=True).values
    ok = torch.isfinite(top.squeeze(1))
    cdf = xs.sub_(torch.where(torch.isfinite(top), top, 0.0)).exp_().cumsum_(dim=-1)
    uniforms = []
    for g in generators:
        assert g is not None
        uniforms.append(torch.rand(1, generator=g, device=g.device, dtype=torch.float64).cpu())
    # 1 - u lies in (0, 1], so the target lies in (0, total]: the first index whose cdf
    # reaches it exists and always has a positive probability.
    u = 1.0 - torch.cat(uniforms).to(xs.device)
    target = (u * cdf[:, -1].double()).to(torch.float32).clamp_(max=cdf[:, -1])
    tokens = torch.searchsorted(cdf, target.unsqueeze(1), side="left").squeeze(1)
    return tokens.clamp_(max=xs.shape[1] - 1), ok & (cdf[:, -1] > 0)


def _fill_logprobs(
    out: list[SampledToken],
    raw_logprobs: torch.Tensor,
    lp_idx: list[int],
    rows: list[SamplingRow],
    tokens: torch.Tensor,
) -> None:
    chosen = raw_logprobs.gather(1, tokens[lp_idx].unsqueeze(1)).squeeze(1).tolist()
    ks = [rows[i].params.logprobs or 0 for i in lp_idx]
    kmax = min(max(ks), raw_logprobs.shape[1])
    top_vals: list[list[float]] = [[] for _ in lp_idx]
    top_ids: list[list[int]] = [[] for _ in lp_idx]
    if kmax > 0:
        top = torch.topk(raw_logprobs, kmax, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(lp_idx):
        entries = dict(zip(top_ids[j][: ks[j]], top_vals[j][: ks[j]]))
        entries[out[i].token_id] = chosen[j]
        out[i].logprob = chosen[j]
        out[i].top_logprobs = entries
