# Triton kernel arguments are pointers, scalars and constexprs, typed by Triton at launch.
# ruff: noqa: ANN001, ANN201
"""Paged decode attention: split-KV flash-decoding with FlashDecoding++'s unified max.

One query per sequence attends to its first `context_lens[b]` cache slots. Stage 1 splits
every sequence's slots into chunks of a FIXED size, `split_tokens` (never a count chosen from
the batch), and one program per (sequence, KV head, chunk) computes a partial softmax for the
G = Hq / Hkv query heads that share the KV head, so each key and value is read once. Stage 2
combines a sequence's partials in chunk order. A sequence's result therefore depends only on
its own query, cache and `split_tokens`, never on the rest of the batch.

Unified max (FlashDecoding++): instead of a running max, every chunk subtracts one preset
offset phi (`softmax_offset`, in units of the scaled logits q.k * scale), so no rescaling is
needed while a chunk is processed nor when chunks are combined. Scores are handled in log2
units, x = q.k * scale * log2(e); a chunk keeps its phi-based result when the largest score of
each of its query heads lies in [phi - low, phi + high] (log2 units, see `unified_max_window`),
and is otherwise recomputed with the exact online softmax (running max). Each partial carries
(acc, sum, max_used), so the combination is exact whichever way a chunk was computed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from thinfer.kernels.decode_reduce import DecodePartials, combine_decode_partials
from thinfer.kernels.store_kv import check_paged_cache, load_kv_tile

# Keys per chunk of stage 1. A fixed size (not a fixed number of chunks) keeps every sequence's
# reduction order independent of the batch. A multiple of the usual block sizes (16, 32).
# Measured (`bench decode-attention --sweep-split-tokens`, H200, batch 1, 32 heads x 128,
# bf16; bench/results/gpu_check_h200): 1024 keys with 2 warps read 2.36 / 3.21 / 3.65 TB/s at
# 8k / 16k / 32k keys, against 1.63 / 3.13 / 3.38 for 512 keys (64-256 were slower still);
# below 8k keys the kernel is launch-bound and no setting stood out.
DECODE_SPLIT_TOKENS = 1024
# Warps per stage-1 program (a launch setting: the numbers do not depend on it).
DECODE_NUM_WARPS = 2
# phi, in units of the scaled logits, measured (`thinfer bench softmax-offset`, SmolLM2 on
# real prompts, bench/results/softmax_offset_*): the largest scaled score per head and chunk
# has median 4.6 and 99th percentile 12.1; phi = 3 keeps 99.6% of the chunks on the unified
# path in fp16 (96.9% at phi = 0) and all of them in bf16 and fp32, whose window is wide.
DEFAULT_SOFTMAX_OFFSET = 3.0
# Keys per inner tile (the second operand of tl.dot needs >= 16 rows).
_TILE_TOKENS = 64
_MIN_DOT_ROWS = 16


def unified_max_window(dtype: torch.dtype) -> tuple[float, float]:
    """(low, high), in log2 units: a chunk keeps the unified-max result when, for each query
    head, its largest score x satisfies phi - low <= x <= phi + high.

    The probabilities p = 2^(x - phi) are accumulated in fp32 and cast to the cache dtype for
    the p @ V product. fp32 and bf16 share fp32's exponent range: with x - phi <= 60 a chunk's
    sum is at most 2^60 per key (no overflow below 2^128 for any chunk shorter than 2^20 keys
    and values below 2^48), and with a largest p >= 2^-60 every term within 2^-24 of it stays
    a normal number (>= 2^-126), so nothing that matters underflows. fp16 tops out near 2^16 and
    becomes subnormal below 2^-14, so its window is [phi - 4, phi + 15]: p never overflows the
    cast and terms down to 2^-10 of the largest keep full precision.
    """
    return (4.0, 15.0) if dtype == torch.float16 else (60.0, 60.0)


@triton.jit
def _split_pass(
    q,
    k_head,
    v_head,
    table,
    start,
    end,
    stride_cb,
    stride_cs,
    dim_ok,
    scale_log2,
    phi_log2,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SAFE_HIGH: tl.constexpr,
    UNIFIED: tl.constexpr,
):
    """One chunk's (acc, sum, max): with UNIFIED, p = 2^(x - phi) and max is the largest
    score seen (used only to check the window); else the exact online softmax, p = 2^(x - m)
    with the running max m, which is returned."""
    acc = tl.zeros(q.shape, dtype=tl.float32)
    total = tl.zeros([q.shape[0]], dtype=tl.float32)
    top = tl.full([q.shape[0]], float("-inf"), dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        k, v, valid = load_kv_tile(
            k_head, v_head, table, first, end, stride_cb, stride_cs, dim_ok, BLOCK_N, BLOCK_SIZE
        )
        x = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        x = tl.where(valid[None, :], x, float("-inf"))
        new_top = tl.maximum(top, tl.max(x, 1))
        if UNIFIED:
            # Clamped so a chunk that will be recomputed cannot overflow (inf, NaN) meanwhile.
            p = tl.exp2(tl.minimum(x - phi_log2, SAFE_HIGH))
            total += tl.sum(p, 1)
        else:
            rescale = tl.exp2(top - new_top)
            p = tl.exp2(x - new_top[:, None])
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        top = new_top
    return acc, total, top


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    acc_ptr,
    sum_ptr,
    max_ptr,
    scale_log2,
    phi_log2,
    num_heads,
    num_splits,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
    SAFE_LOW: tl.constexpr,
    SAFE_HIGH: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * SPLIT_TOKENS
    end = tl.minimum(start + SPLIT_TOKENS, context_len)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    mask = row_ok[:, None] & dim_ok[None, :]
    q_rows = q_ptr + (seq * num_heads + heads[:, None]) * HEAD_DIM
    q = tl.load(q_rows + dims[None, :], mask=mask, other=0.0)
    table = block_tables_ptr + seq * stride_tb
    head = kv_head * stride_ch + dims[None, :] * stride_cd
    k_head = k_cache_ptr + head
    v_head = v_cache_ptr + head
    acc, total, seen_max = _split_pass(
        q, k_head, v_head, table, start, end, stride_cb, stride_cs, dim_ok, scale_log2, phi_log2,
        BLOCK_SIZE, BLOCK_N, SAFE_HIGH, UNIFIED=True,
    )  # fmt: skip
    max_used = tl.zeros([GROUP_PAD], dtype=tl.float32) + phi_log2
    # Fallback: some head's largest score left the safe window, so redo the chunk exactly.
    distance = tl.where(row_ok, seen_max - phi_log2, 0.0)
    unsafe = (tl.max(distance, 0) > SAFE_HIGH) | (tl.min(distance, 0) < -SAFE_LOW)
    if unsafe & (start < end):
        acc, total, max_used = _split_pass(
            q, k_head, v_head, table, start, end, stride_cb, stride_cs, dim_ok, scale_log2,
            phi_log2, BLOCK_SIZE, BLOCK_N, SAFE_HIGH, UNIFIED=False,
        )  # fmt: skip
    # A chunk starting at or beyond the context is empty: zero sum, max -inf.
    max_used = tl.where(start < end, max_used, float("-inf"))
    partial = (seq * num_heads + heads) * num_splits + split
    tl.store(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=mask)
    tl.store(sum_ptr + partial, total, mask=row_ok)
    tl.store(max_ptr + partial, max_used, mask=row_ok)


def _tile_tokens(split_tokens: int) -> int:
    """Largest power-of-two tile (>= 16, <= _TILE_TOKENS) dividing the chunk size."""
    if split_tokens <= 0 or split_tokens % _MIN_DOT_ROWS:
        raise ValueError(f"split_tokens must be a positive multiple of 16, got {split_tokens}")
    tile = _TILE_TOKENS
    while split_tokens % tile:
        tile //= 2
    return tile


def num_decode_splits(max_blocks: int, block_size: int, split_tokens: int) -> int:
    """Chunks per sequence for a block table `max_blocks` wide (at least one)."""
    return max(1, math.ceil(max_blocks * block_size / split_tokens))


def decode_split_partials(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    split_tokens: int = DECODE_SPLIT_TOKENS,
    softmax_offset: float = DEFAULT_SOFTMAX_OFFSET,
    num_warps: int = DECODE_NUM_WARPS,
) -> DecodePartials:
    """Stage 1 of `paged_decode_attention`: the partial softmax of every chunk."""
    check_paged_cache(k_cache, v_cache)
    q, block_tables = q.contiguous(), block_tables.contiguous()
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    num_splits = num_decode_splits(block_tables.shape[1], block_size, split_tokens)
    acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    sums = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    maxima = torch.empty_like(sums)
    low, high = unified_max_window(v_cache.dtype)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        acc,
        sums,
        maxima,
        scale * math.log2(math.e),
        softmax_offset * math.log2(math.e),
        num_heads,
        num_splits,
        *k_cache.stride(),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_N=_tile_tokens(split_tokens),
        SPLIT_TOKENS=split_tokens,
        SAFE_LOW=low,
        SAFE_HIGH=high,
        num_warps=num_warps,
    )
    return DecodePartials(acc, sums, maxima)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    split_tokens: int = DECODE_SPLIT_TOKENS,
    softmax_offset: float = DEFAULT_SOFTMAX_OFFSET,
    num_warps: int = DECODE_NUM_WARPS,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over the paged cache [blocks, block_size, Hkv, D]:
    sequence b attends to its first context_lens[b] (>= 1) slots through block_tables[b].

    The same contract as `thinfer.attention.torch_paged.decode_attention`. The number of
    chunks comes from the table's width, ceil(max_blocks * block_size / split_tokens); chunks
    past a sequence's context are written empty and never read.
    """
    partials = decode_split_partials(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        scale,
        split_tokens,
        softmax_offset,
        num_warps,
    )
    return combine_decode_partials(partials, context_lens, split_tokens, q.dtype)
