"""KVCache.compact: hole filling keeps exactly the chosen slots (moving at most as many as
were evicted), per layer/head when asked, and freed blocks return to the pool."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinfer.attention.torch_paged import gather_kv
from thinfer.compression.compaction import CompactionPlan, plan_compaction
from thinfer.config import ModelConfig
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.sequence import Sequence
from thinfer.sampling_params import SamplingParams

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def filled_sequence(kv: KVCache, length: int) -> tuple[Sequence, torch.Tensor]:
    """A sequence of `length` slots whose K/V hold recognisable values; returns dense copy."""
    seq = Sequence(0, "r", 0, [1] * length, SamplingParams(), None)
    kv.append_slots(seq, length)
    slots = torch.tensor(kv.slot_mapping(seq, length))  # slots 0..length-1 (kv_len is 0)
    seq.kv_len = length
    dense = torch.randn(CFG.num_hidden_layers, 2, length, 2, CFG.head_dim)
    for layer, (k_cache, v_cache) in enumerate(kv.layer_caches()):
        k_cache.view(-1, 2, CFG.head_dim)[slots] = dense[layer, 0]
        v_cache.view(-1, 2, CFG.head_dim)[slots] = dense[layer, 1]
    return seq, dense


def cached(kv: KVCache, seq: Sequence) -> torch.Tensor:
    table = torch.tensor(seq.block_table, dtype=torch.long)
    return torch.stack(
        [
            torch.stack([gather_kv(k, table, seq.kv_len), gather_kv(v, table, seq.kv_len)])
            for k, v in kv.layer_caches()
        ]
    )


def make_cache() -> KVCache:
    kv = KVCache(CFG, num_blocks=24, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    # scatter the free list so block tables are not contiguous
    kv._free = type(kv._free)(
        torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()
    )
    return kv


def sources(plan: CompactionPlan, length: int) -> torch.Tensor:
    """Which original slot each slot holds after the plan: [..., new_len]."""
    slots = torch.arange(length).expand(*plan.dst.shape[:-1], length).clone()
    plan.apply_to(slots)
    return slots[..., : plan.new_len]


def compact(kv: KVCache, seq: Sequence, keep: torch.Tensor, length: int) -> CompactionPlan:
    """Compact to the slots `keep` ([n] or [L, H, n] indices); returns the plan."""
    mask = torch.zeros(*keep.shape[:-1], length, dtype=torch.bool).scatter_(-1, keep, True)
    plan = plan_compaction(mask, keep.shape[-1])
    kv.compact(seq, plan)
    return plan


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 60), data=st.data())
def test_shared_compaction_equals_dense_selection(length, data):
    kv = make_cache()
    seq, dense = filled_sequence(kv, length)
    keep = sorted(data.draw(st.sets(st.integers(0, length - 1), max_size=length)))
    plan = compact(kv, seq, torch.tensor(keep, dtype=torch.long), length)
    held = sources(plan, length)
    assert sorted(held.tolist()) == keep  # exactly the kept slots
    assert plan.dst.shape[-1] <= length - len(keep)  # moved no more than were evicted
    assert seq.kv_len == len(keep)
    assert torch.equal(cached(kv, seq), dense[:, :, held])
    assert len(seq.block_table) == kv.blocks_for(len(keep))
    assert kv.num_free_blocks == 24 - len(seq.block_table)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(2, 60), data=st.data())
def test_per_head_compaction_equals_dense_selection(length, data):
    kv = make_cache()
    seq, dense = filled_sequence(kv, length)
    count = data.draw(st.integers(1, length))
    keep = torch.stack(
        [
            torch.stack([torch.randperm(length)[:count].sort().values for _ in range(2)])
            for _ in range(CFG.num_hidden_layers)
        ]
    )
    plan = compact(kv, seq, keep, length)
    held = sources(plan, length)
    got = cached(kv, seq)
    for layer in range(CFG.num_hidden_layers):
        for head in range(2):
            assert held[layer, head].sort().values.tolist() == keep[layer, head].tolist()
            expected = dense[layer, :, held[layer, head], head]
            assert torch.equal(got[layer, :, :, head], expected)


def test_compaction_rejects_bad_plans():
    kv = make_cache()
    seq, _ = filled_sequence(kv, 10)
    empty = torch.empty(0, dtype=torch.long)
    with pytest.raises(ValueError, match="keeps 11 slots"):
        kv.compact(seq, CompactionPlan(11, empty, empty))
    with pytest.raises(ValueError, match="per-head plan"):
        kv.compact(seq, CompactionPlan(5, torch.zeros(2, 2, 1, dtype=torch.long), empty))


def keep_indices(scores: torch.Tensor, count: int, kv_len: int) -> torch.Tensor:
    """Dense reference of the keep rule, in position order: of the `num_old` oldest entries
    keep the `count` best (ties: the older; never a -inf one, always every +inf one), plus
    every later entry. Ascending indices."""
    num_old = scores.shape[-1]
    if num_old:
        keepable = int((scores > float("-inf")).sum(dim=-1).min())
        forced = int(torch.isposinf(scores).sum(dim=-1).max())
        count = max(min(count, keepable), forced)
    count = min(count, num_old)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    chosen = order.sort(dim=-1).values
    recent = torch.arange(num_old, kv_len, device=scores.device)
    return torch.cat([chosen, recent.expand(*scores.shape[:-1], -1)], dim=-1)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 40),
    per_head=st.booleans(),
    data=st.data(),
)
def test_slot_order_keep_rule_equals_the_position_order_rule(n, per_head, data):
    """The O(n) keep rule on permuted slots (ties, +inf protection, -inf) keeps exactly what
    the sorted rule keeps, and the plan built from it holds exactly the kept slots."""
    from thinfer.compression.compaction import keep_mask

    rows = (2, 3) if per_head else ()
    seed = data.draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    count = 6 if per_head else 1
    positions = torch.stack([torch.randperm(n, generator=gen) for _ in range(count)])
    positions = positions.view(*rows, n)
    scores = torch.randint(0, 4, (*rows, n), generator=gen).float()
    if data.draw(st.booleans()):
        scores[..., data.draw(st.integers(0, n - 1))] = float("-inf")
    protected = torch.rand(*rows, n, generator=gen) < 0.1
    num_recent, keep_count = data.draw(st.integers(0, n)), data.draw(st.integers(0, n))
    order = torch.sort(positions, dim=-1).indices
    old = n - num_recent
    ranked = scores.gather(-1, order)[..., :old]
    ranked = ranked.masked_fill(protected.gather(-1, order)[..., :old], float("inf"))
    kept = order.gather(-1, keep_indices(ranked, keep_count, n))
    expected = torch.zeros(*rows, n, dtype=torch.bool).scatter_(-1, kept, True)
    got = keep_mask(scores, positions, protected, num_recent, keep_count)
    assert torch.equal(got, expected)
    plan = plan_compaction(got, kept.shape[-1])
    held = sources(plan, n).sort(dim=-1).values
    assert torch.equal(held, kept.sort(dim=-1).values)
    assert plan.dst.shape[-1] <= n - kept.shape[-1]


@pytest.mark.parametrize("pool_blocks", [8, 4096])
def test_reading_a_sequences_keys_costs_the_sequence_not_the_pool(pool_blocks):
    """SnapKV and R-KV read a sequence's keys layer by layer through `layer_keys`; the
    largest allocation it makes must be the sequence's size whatever the pool's size (once,
    a non-contiguous index_select copied the whole K half of the pool per call)."""
    from thinfer.engine.kv_cache import KVCache
    from thinfer.engine.sequence import Sequence
    from thinfer.loading.dummy import preset_config
    from thinfer.sampling_params import SamplingParams

    cfg = preset_config("tiny")
    kv = KVCache(cfg, pool_blocks, 16, torch.float32, torch.device("cpu"))
    seq = Sequence(0, "r", 0, [1] * 20, SamplingParams(), None)
    kv.append_slots(seq, 20)
    seq.kv_len = 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:  # fmt: skip
        keys = kv.layer_keys(seq, 1)
    assert keys.shape[0] == 20
    largest = max(e.cpu_memory_usage for e in prof.events())
    per_block = 16 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert largest <= 2 * per_block, (largest, per_block)  # its 2 blocks, not the pool's
