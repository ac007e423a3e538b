"""The native decode attention (C kernel, blocks read in place) against the torch reference
`torch_paged.decode_attention` on ragged batches with scattered block tables and GQA."""

from __future__ import annotations

import pytest
import torch

from thinfer.attention import torch_paged
from thinfer.attention.metadata import AttentionMetadata
from thinfer.kernels.cpu_attention import native_decode_applies, native_decode_attention
from thinfer.kernels.cpu_native import native_library

pytestmark = pytest.mark.skipif(native_library() is None, reason="no native CPU kernels here")


# head sizes 64 and 128 take the register-held value sums, 12 the scalar fallback
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 12), (2, 1, 128)])
def test_matches_the_torch_reference_on_a_ragged_batch(q_heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(q_heads)
    block_size, num_blocks = 4, 40
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    lengths = [1, 7, 4, 33, 16, 70]  # one slot, partial blocks, whole blocks, 3 chunks
    order = torch.randperm(num_blocks, generator=gen)  # blocks scattered through the cache
    width = max((n + block_size - 1) // block_size for n in lengths)
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    used = 0
    for row, n in enumerate(lengths):
        count = (n + block_size - 1) // block_size
        tables[row, :count] = order[used : used + count]
        used += count
    q = torch.randn(len(lengths), q_heads, head_dim, generator=gen) * 3
    context = torch.tensor(lengths)
    assert native_decode_applies(q, k_cache)
    got = native_decode_attention(q, k_cache, v_cache, tables, context, 0.25)
    want = torch_paged.decode_attention(q, k_cache, v_cache, tables, context, max(lengths), 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the queries as a view of a fused projection's rows (read in place, not copied)
    rows = torch.randn(len(lengths), q_heads * head_dim + 40, generator=gen)
    rows[:, : q_heads * head_dim] = q.reshape(len(lengths), -1)
    view = rows[:, : q_heads * head_dim].view(len(lengths), q_heads, head_dim)
    assert not view.is_contiguous()
    assert torch.equal(native_decode_attention(view, k_cache, v_cache, tables, context, 0.25), got)


def test_only_fp32_cpu_tensors_apply_and_bad_shapes_are_refused():
    cache = torch.zeros(2, 4, 2, 8)
    assert not native_decode_applies(torch.zeros(1, 4, 8, dtype=torch.float16), cache)
    assert not native_decode_applies(torch.zeros(1, 4, 8), cache.half())
    with pytest.raises(ValueError, match="decode attention"):
        native_decode_attention(
            torch.zeros(1, 3, 8),
            cache,
            cache,
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, dtype=torch.long),
            1.0,
        )
    with pytest.raises(ValueError, match="table rows"):
        native_decode_attention(
            torch.zeros(2, 4, 8),
            cache,
            cache,
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(2, dtype=torch.long),
            1.0,
            torch.zeros(3, dtype=torch.long),
        )


def test_a_step_of_decodes_and_prefill_chunks_matches_sdpa_row_by_row():
    """The torch backend's native path: every row of a step (decodes, then chunks whose keys
    were stored first) as a decode of its own over its sequence's table (`table_rows`), equal
    to the per-row calls bitwise and to SDPA on the gathered keys."""
    gen = torch.Generator().manual_seed(5)
    block_size, kv_heads, q_heads, head_dim = 4, 2, 6, 64
    k_cache, v_cache = (
        torch.randn(40, block_size, kv_heads, head_dim, generator=gen) for _ in "kv"
    )
    tables = torch.randperm(40, generator=gen)[:36].view(3, 12)
    contexts, query_lens = [9, 30, 47], [1, 12, 47]  # a decode, a chunk after a prefix, a prompt
    meta = AttentionMetadata(
        torch.zeros(sum(query_lens), dtype=torch.long), tables, torch.tensor(contexts),
        contexts, query_lens, [0, 1, 13], 1, block_size,
    )  # fmt: skip
    q = torch.randn(sum(query_lens), q_heads, head_dim, generator=gen)
    out = torch_paged.paged_attention(q, k_cache, v_cache, meta, 0.125)
    start = 0
    for seq, (context, count) in enumerate(zip(contexts, query_lens, strict=True)):
        rows = slice(start, start + count)
        keys, values = (torch_paged.gather_kv(c, tables[seq], context) for c in (k_cache, v_cache))
        want = torch_paged.prefill_attention(q[rows], keys, values, 0.125)
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
        for i in range(count):
            one = native_decode_attention(
                q[start + i : start + i + 1], k_cache, v_cache, tables[seq : seq + 1],
                torch.tensor([context - count + 1 + i]), 0.125,
            )  # fmt: skip
            assert torch.equal(one[0], out[start + i])
        start += count
