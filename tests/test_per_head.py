"""H2O, SnapKV and R-KV: kept sets on small hand-made tensors equal direct dense
implementations of the published definitions (written here with plain loops)."""

from __future__ import annotations

import math

import torch
from compression_utils import make_state, select
from hypothesis import given, settings
from hypothesis import strategies as st

from thinfer.attention.torch_paged import decode_attention_with_probs, prefill_column_sums
from thinfer.compression import CompressionConfig
from thinfer.compression.compaction import plan_compaction

LAYERS, KV_HEADS, GROUP, DIM = 2, 2, 2, 8


def top_with_earliest_ties(scores: list[float], count: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])


def dense_window_probs(q: torch.Tensor, k: torch.Tensor, query_slot: int) -> list[float]:
    """Softmax of one query [D] over keys [n, D], causal at `query_slot`."""
    logits = [float(q @ k[j]) / math.sqrt(q.shape[0]) for j in range(query_slot + 1)]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps] + [0.0] * (k.shape[0] - query_slot - 1)


def dense_pool(values: list[float], kernel: int) -> list[float]:
    half = kernel // 2
    n = len(values)
    return [max(values[max(0, i - half) : min(n, i + half + 1)]) for i in range(n)]


def dense_snapkv_head(queries, keys, layer, head, num_old, kernel):
    n, w = keys.shape[1], queries.shape[1]
    rows = []
    for g in range(GROUP):
        for j in range(w):
            q = queries[layer, j, head * GROUP + g]
            rows.append(dense_window_probs(q, keys[layer, :, head], n - w + j))
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(num_old)]
    return dense_pool(mean, kernel)


def dense_rkv_head(queries, keys, layer, head, num_old, kernel, lam, threshold):
    """R-KV as its reference code defines it: importance from the group's max raw logit,
    softmax over the older keys, mean over the window's queries, max-pooled; redundancy over
    all keys: cosine similarity, diagonal zeroed, each row's latest near-duplicate column
    (column 0 when none) zeroed, the column mean, a softmax over all keys."""
    n, w = keys.shape[1], queries.shape[1]
    per_query = []
    for j in range(w):
        logits = []
        for i in range(num_old):
            group = [
                float(queries[layer, j, head * GROUP + g] @ keys[layer, i, head])
                for g in range(GROUP)
            ]
            logits.append(max(group) / math.sqrt(DIM))
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        per_query.append([e / sum(exps) for e in exps])
    importance = dense_pool([sum(r[i] for r in per_query) / w for i in range(num_old)], kernel)
    k = keys[layer, :, head]
    unit = [k[i] / (k[i].norm() + 1e-8) for i in range(n)]
    sims = [[0.0 if i == j else float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    for i in range(n):
        near = [j for j in range(n) if sims[i][j] > threshold]
        sims[i][max(near) if near else 0] = 0.0
    column_means = [sum(sims[i][j] for i in range(n)) / n for j in range(n)]
    top = max(column_means)
    exps = [math.exp(x - top) for x in column_means]
    redundancy = [e / sum(exps) for e in exps]
    return [lam * a - (1 - lam) * r for a, r in zip(importance, redundancy[:num_old])]


def check_keep(
    keep: torch.Tensor, expected_old: dict[tuple[int, int], list[int]], num_old: int, n: int
):
    assert keep.shape[:2] == (LAYERS, KV_HEADS)
    for (layer, head), old in expected_old.items():
        assert keep[layer, head].tolist() == old + list(range(num_old, n))


@settings(max_examples=25, deadline=None)
@given(st.integers(12, 40), st.integers(0, 2**31), st.sampled_from(["snapkv", "rkv"]))
def test_snapkv_and_rkv_keep_what_the_dense_definition_keeps(budget, seed, method):
    gen = torch.Generator().manual_seed(seed)
    n = budget + 5
    keys = torch.randn(LAYERS, n, KV_HEADS, DIM, generator=gen)
    keys[:, 3] = keys[:, 1] * 2  # a near-duplicate pair, so redundancy matters
    window = 4
    queries = torch.randn(LAYERS, window, KV_HEADS * GROUP, DIM, generator=gen)
    config = CompressionConfig(method, budget=budget, observation_window=window, interval=4)
    state = make_state(config, n, LAYERS, KV_HEADS)
    keep = select(config, n, generated=8, state=state, keys=keys, queries=queries)
    num_old, count = n - window, budget - 1 - window
    expected = {}
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            if method == "snapkv":
                scores = dense_snapkv_head(queries, keys, layer, head, num_old, 7)
            else:
                scores = dense_rkv_head(queries, keys, layer, head, num_old, 7, 0.1, 0.5)
            expected[(layer, head)] = top_with_earliest_ties(scores, count)
    check_keep(keep, expected, num_old, n)
    assert keep.shape[-1] == budget - 1


def test_snapkv_waits_for_its_interval():
    config = CompressionConfig("snapkv", budget=10, observation_window=2, interval=8)
    queries = torch.randn(LAYERS, 2, KV_HEADS * GROUP, DIM)
    keys = torch.randn(LAYERS, 20, KV_HEADS, DIM)

    def keep(n: int, generated: int) -> torch.Tensor | None:
        state = make_state(config, n, LAYERS, KV_HEADS)
        return select(config, n, generated, state=state, keys=keys[:, :n], queries=queries)

    assert keep(15, generated=7) is None  # over budget, not yet
    assert keep(9, generated=8) is None  # on time, under budget
    assert keep(15, generated=8).shape == (LAYERS, KV_HEADS, 9)


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 30), st.integers(0, 29), st.integers(1, 12), st.integers(0, 2**31))
def test_h2o_keeps_heavy_hitters_and_recent(budget, window, steps, seed):
    """Accumulated attention per token (tracked densely by token position), the heavy
    hitters plus the recent window kept, through real compactions (slots get reordered)."""
    window = min(window, budget - 1)
    gen = torch.Generator().manual_seed(seed)
    config = CompressionConfig("h2o", budget=budget, window=window)
    n = budget - 1
    state = make_state(config, n, LAYERS, KV_HEADS)
    dense = [[dict.fromkeys(range(n), 0.0) for _ in range(KV_HEADS)] for _ in range(LAYERS)]
    position = n  # of the next token (with window 0 even the newest may be evicted)
    for step in range(steps):
        n = state.length
        sums = torch.randint(0, 6, (LAYERS, KV_HEADS, n), generator=gen) / 4  # ties
        state.value("attention").add_(sums)
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                for slot, token in enumerate(state.positions[layer, head].tolist()):
                    dense[layer][head][token] += float(sums[layer, head, slot])
        keep = select(config, n, generated=step + 1, state=state)
        if n < budget:
            assert keep is None
        else:
            heavy = budget - 1 - window
            for layer in range(LAYERS):
                for head in range(KV_HEADS):
                    acc = dense[layer][head]
                    old = sorted(acc)[: n - window]
                    chosen = top_with_earliest_ties([acc[p] for p in old], heavy)
                    expected = [old[i] for i in chosen] + sorted(acc)[n - window :]
                    kept = state.positions[layer, head][keep[layer, head]].tolist()
                    assert sorted(kept) == expected
                    dense[layer][head] = {p: acc[p] for p in expected}
            mask = torch.zeros(LAYERS, KV_HEADS, n, dtype=torch.bool)
            state.apply(plan_compaction(mask.scatter_(-1, keep, True), keep.shape[-1]))
        state.append(torch.tensor([position]), torch.zeros(1, dtype=torch.bool))  # written
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                dense[layer][head][position] = 0.0
        position += 1


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["h2o", "snapkv", "rkv"]),
    st.integers(10, 60),
    st.integers(0, 8),
    st.floats(0.0, 0.9),
    st.sampled_from(["native", "uniform"]),
    st.data(),
)
def test_recent_window_is_always_kept_and_counts_match(
    method, budget, window, ratio, trigger, data
):
    n = data.draw(st.integers(budget, 2 * budget))
    own = {} if method == "h2o" else {"observation_window": 3}
    config = CompressionConfig(
        method, budget=budget, window=window, ratio=ratio, trigger=trigger, **own
    )
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    keys = torch.randn(LAYERS, n, KV_HEADS, DIM, generator=gen)
    state = make_state(config, n, LAYERS, KV_HEADS)
    if method == "h2o":
        state.value("attention").copy_(torch.rand(LAYERS, KV_HEADS, n, generator=gen))
    queries = torch.randn(LAYERS, 3, KV_HEADS * GROUP, DIM, generator=gen)
    keep = select(config, n, 128, state=state, keys=keys, queries=queries)
    if trigger == "uniform":
        recent, count = window, math.floor(ratio * (n - window))
    else:
        recent = window if method == "h2o" else 3
        count = budget - 1 - recent
    assert keep.shape == (LAYERS, KV_HEADS, count + recent)
    for row in keep.reshape(LAYERS * KV_HEADS, -1).tolist():
        assert row == sorted(set(row))
        assert row[len(row) - recent :] == list(range(n - recent, n))


def test_column_sums_equal_dense_softmax():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, c, n = 4, 2, 23, 9
    q = torch.randn(n, heads, DIM, generator=gen)
    keys = torch.randn(c, kv_heads, DIM, generator=gen)
    sums = prefill_column_sums(q, keys, DIM**-0.5)
    for h in range(heads):
        for i in range(n):
            probs = dense_window_probs(q[i, h], keys[:, h // (heads // kv_heads)], c - n + i)
            for j in range(c):
                sums[h, j] -= probs[j]
    assert sums.abs().max() < 1e-5
    # decode path over a paged cache: probabilities of one query each
    block, batch = 4, 2
    k_cache = torch.randn(8, block, kv_heads, DIM, generator=gen)
    v_cache = torch.randn(8, block, kv_heads, DIM, generator=gen)
    tables = torch.tensor([[3, 1, 6], [0, 2, 5]])
    lens = torch.tensor([11, 7])
    q = torch.randn(batch, heads, DIM, generator=gen)
    out, probs = decode_attention_with_probs(q, k_cache, v_cache, tables, lens, 11, DIM**-0.5)
    for b in range(batch):
        flat_k = k_cache[tables[b]].reshape(-1, kv_heads, DIM)
        flat_v = v_cache[tables[b]].reshape(-1, kv_heads, DIM)
        for h in range(heads):
            kv = h // (heads // kv_heads)
            dense = dense_window_probs(q[b, h], flat_k[: lens[b], kv], int(lens[b]) - 1)
            assert torch.allclose(probs[b, h, : lens[b]], torch.tensor(dense), atol=1e-6)
            assert not probs[b, h, lens[b] :].any()
            expected = torch.tensor(dense) @ flat_v[: lens[b], kv]
            assert torch.allclose(out[b, h], expected, atol=1e-5)
