"""H2O, SnapKV and R-KV: kept sets on small hand-made tensors equal direct dense
implementations of the published definitions (written here with plain loops)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinfer import SamplingParams
from thinfer.attention.torch_paged import decode_attention_with_probs, prefill_column_sums
from thinfer.compression import CompressionConfig, make_policy
from thinfer.engine.sequence import Sequence

LAYERS, KV_HEADS, GROUP, DIM = 2, 2, 2, 8


class FakeCache:
    """Stands in for KVCache.sequence_keys: the keys of one sequence, [L, n, Hkv, D]."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys

    def sequence_keys(self, seq: Sequence) -> torch.Tensor:
        return self.keys[:, : seq.kv_len]


def fake_seq(kv_len: int, generated: int) -> Sequence:
    seq = Sequence(0, "r", 0, [1] * (kv_len - generated + 1), SamplingParams(), None)
    seq.output_token_ids = [2] * generated
    seq.kv_len = seq.num_computed_tokens = kv_len
    return seq


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
    n, w = keys.shape[1], queries.shape[1]
    per_query = []
    for j in range(w):
        group_rows = [
            dense_window_probs(queries[layer, j, head * GROUP + g], keys[layer, :, head], n - w + j)
            for g in range(GROUP)
        ]
        per_query.append([max(r[i] for r in group_rows) for i in range(num_old)])
    importance = dense_pool([sum(r[i] for r in per_query) / w for i in range(num_old)], kernel)
    k = keys[layer, :num_old, head]
    unit = [k[i] / k[i].norm() for i in range(num_old)]
    row_means = []
    for i in range(num_old):
        sims = [0.0 if i == j else float(unit[i] @ unit[j]) for j in range(num_old)]
        near = [j for j in range(num_old) if sims[j] > threshold]
        if near:
            sims[max(near)] = 0.0
        row_means.append(sum(sims) / num_old)
    top = max(row_means)
    exps = [math.exp(x - top) for x in row_means]
    redundancy = [e / sum(exps) for e in exps]
    return [lam * a - (1 - lam) * r for a, r in zip(importance, redundancy)]


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
    policy = make_policy(config)
    policy.queries = queries
    keep = policy.select(fake_seq(n, generated=8), FakeCache(keys))
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
    policy = make_policy(config)
    policy.queries = torch.randn(LAYERS, 2, KV_HEADS * GROUP, DIM)
    keys = FakeCache(torch.randn(LAYERS, 20, KV_HEADS, DIM))
    assert policy.select(fake_seq(15, generated=7), keys) is None  # over budget, not yet
    assert policy.select(fake_seq(9, generated=8), keys) is None  # on time, under budget
    assert policy.select(fake_seq(15, generated=8), keys).shape == (LAYERS, KV_HEADS, 9)


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 30), st.integers(0, 29), st.integers(1, 12), st.integers(0, 2**31))
def test_h2o_keeps_heavy_hitters_and_recent(budget, window, steps, seed):
    window = min(window, budget - 1)
    gen = torch.Generator().manual_seed(seed)
    policy = make_policy(CompressionConfig("h2o", budget=budget, window=window))
    prompt = budget - 1
    seq = fake_seq(prompt, generated=0)
    dense = [[[0.0] * prompt for _ in range(KV_HEADS)] for _ in range(LAYERS)]
    for _ in range(steps):
        sums = torch.randint(0, 6, (LAYERS, KV_HEADS, seq.kv_len), generator=gen) / 4  # ties
        policy.observe_attention(seq, None, sums)
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                for slot in range(seq.kv_len):
                    dense[layer][head][slot] += float(sums[layer, head, slot])
        keep = policy.select(seq)
        n = seq.kv_len
        if n < budget:
            assert keep is None
        else:
            heavy = budget - 1 - window
            for layer in range(LAYERS):
                for head in range(KV_HEADS):
                    acc = dense[layer][head]
                    old = top_with_earliest_ties(acc[: n - window], heavy)
                    kept = old + list(range(n - window, n))
                    assert keep[layer, head].tolist() == kept
                    dense[layer][head] = [acc[i] for i in kept]
            seq.kv_len = keep.shape[-1]
        seq.kv_len += 1  # the new token is written
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                dense[layer][head].append(0.0)


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
    config = CompressionConfig(
        method, budget=budget, window=window, ratio=ratio, trigger=trigger, observation_window=3
    )
    policy = make_policy(config)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    keys = torch.randn(LAYERS, n, KV_HEADS, DIM, generator=gen)
    seq = fake_seq(n, generated=128)
    if method == "h2o":
        policy.observe_attention(seq, None, torch.rand(LAYERS, KV_HEADS, n, generator=gen))
    else:
        policy.queries = torch.randn(LAYERS, 3, KV_HEADS * GROUP, DIM, generator=gen)
    keep = policy.select(seq, FakeCache(keys))
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
