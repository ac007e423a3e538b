"""KVCache.compact: kept slots move to the front in order, per layer/head when asked, and
freed blocks return to the pool."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thinfer.attention.torch_paged import gather_kv
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


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 60), data=st.data())
def test_shared_compaction_equals_dense_selection(length, data):
    kv = make_cache()
    seq, dense = filled_sequence(kv, length)
    keep = sorted(data.draw(st.sets(st.integers(0, length - 1), max_size=length)))
    kv.compact(seq, torch.tensor(keep, dtype=torch.long))
    assert seq.kv_len == len(keep)
    assert torch.equal(cached(kv, seq), dense[:, :, keep])
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
    kv.compact(seq, keep)
    got = cached(kv, seq)
    for layer in range(CFG.num_hidden_layers):
        for head in range(2):
            expected = dense[layer, :, keep[layer, head], head]
            assert torch.equal(got[layer, :, :, head], expected)


def test_compaction_rejects_bad_indices():
    kv = make_cache()
    seq, _ = filled_sequence(kv, 10)
    with pytest.raises(ValueError, match="beyond kv_len"):
        kv.compact(seq, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="keep must be"):
        kv.compact(seq, torch.zeros(2, 2, dtype=torch.long))
