# Triton kernel arguments are pointers, scalars and constexprs, typed by Triton at launch.
# ruff: noqa: ANN001
"""Paged prefill attention: causal flash attention of new query chunks over the paged cache.

Sequence s brings query_lens[s] new queries (flat rows query_starts[s] ...) whose keys and
values are already written to its cache; it attends to its first context_lens[s] slots. Query
i sits in slot context_len - query_len + i and sees slots <= its own (chunked prefill: the
earlier slots were cached by previous steps). Keys and values are read straight from the
cache blocks through the block table, never gathered.

One program handles one (sequence, KV head, tile of queries) and packs the G = Hq / Hkv query
heads of the KV head into the rows of its tile (row r = query r // G, head r % G), so every
key tile is loaded once for all of them. Softmax is the exact online (running-max) one.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from thinfer.kernels.store_kv import check_paged_cache, load_kv_tile

# (query, head) rows per program and keys per inner tile.
_BLOCK_ROWS = 64
_BLOCK_KEYS = 64
_MIN_DOT_ROWS = 16


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_starts_ptr,
    query_lens_ptr,
    context_lens_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_tb,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUERIES_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    query_len = tl.load(query_lens_ptr + seq)
    query_start = tl.load(query_starts_ptr + seq)
    context_len = tl.load(context_lens_ptr + seq)
    first_query = tile * QUERIES_PER_TILE
    rows = tl.arange(0, BLOCK_M)
    query = first_query + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < QUERIES_PER_TILE * GROUP) & (query < query_len)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    row_mask = row_ok[:, None] & dim_ok[None, :]
    q_rows = q_ptr + (query_start + query)[:, None] * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_mask, other=0.0)
    query_slot = context_len - query_len + query
    # Keys up to the tile's last query slot; none when the tile lies past the sequence.
    key_end = tl.minimum(context_len - query_len + first_query + QUERIES_PER_TILE, context_len)
    key_end = tl.where(first_query < query_len, key_end, 0)
    table = block_tables_ptr + seq * stride_tb
    head = kv_head * stride_ch + dims[None, :] * stride_cd
    k_head = k_cache_ptr + head
    v_head = v_cache_ptr + head

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for first in range(0, key_end, BLOCK_N):
        k, v, valid = load_kv_tile(
            k_head, v_head, table, first, key_end, stride_cb, stride_cs, dim_ok, BLOCK_N, BLOCK_SIZE
        )
        x = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        keys = first + tl.arange(0, BLOCK_N)
        seen = valid[None, :] & (keys[None, :] <= query_slot[:, None])
        x = tl.where(seen, x, float("-inf"))
        # Slot 0 is visible to every row, so the running max is finite after the first tile.
        new_max = tl.maximum(running_max, tl.max(x, 1))
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(x - new_max[:, None])
        total = total * rescale + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision="ieee")
        running_max = new_max
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    out_rows = out_ptr + (query_start + query)[:, None] * stride_qt + heads[:, None] * stride_qh
    tl.store(out_rows + dims[None, :] * stride_qd, out.to(out_ptr.dtype.element_ty), mask=row_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of the flat prefill queries q [T, Hq, D] over the paged cache.

    Sequence s owns rows query_starts[s] .. + query_lens[s] of q (rows of no sequence are
    left unwritten), its block table block_tables[s] and context_lens[s] >= query_lens[s]
    cached slots, the last query_lens[s] of them being its new tokens. Per sequence this
    matches `torch_paged.prefill_attention` on `torch_paged.gather_kv` of its cache.
    `max_query_len` (the largest query_lens) sizes the grid; give it to avoid a device sync.
    """
    check_paged_cache(k_cache, v_cache)
    q, block_tables = q.contiguous(), block_tables.contiguous()
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if group > _BLOCK_ROWS:
        raise ValueError(f"at most {_BLOCK_ROWS} query heads per KV head, got {group}")
    out = torch.empty_like(q)
    num_seqs = query_lens.shape[0]
    if max_query_len is None:
        max_query_len = int(query_lens.max()) if num_seqs else 0
    if num_seqs == 0 or max_query_len == 0:
        return out
    queries_per_tile = _BLOCK_ROWS // group
    _prefill_kernel[(num_seqs, num_kv_heads, math.ceil(max_query_len / queries_per_tile))](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_starts,
        query_lens,
        context_lens,
        scale * math.log2(math.e),
        *q.stride(),
        *k_cache.stride(),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        QUERIES_PER_TILE=queries_per_tile,
        BLOCK_M=_BLOCK_ROWS,
        BLOCK_N=_BLOCK_KEYS,
        num_warps=4,
    )
    return out
