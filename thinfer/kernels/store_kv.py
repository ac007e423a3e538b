# Triton kernel arguments are pointers, scalars and constexprs, typed by Triton at launch.
# ruff: noqa: ANN001, ANN201
"""The paged KV layout in Triton: writing new keys/values into their slots, and reading a
sequence's slots back tile by tile.

The cache of one layer is a pair [num_blocks, block_size, Hkv, D]; flat slot s is row
s % block_size of block s // block_size, and a sequence's i-th slot is flat slot
block_table[i // block_size] * block_size + i % block_size. Per-head compaction only moves
data within this layout, so the same addressing serves compacted caches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    offsets = row + heads * stride_ch + dims * stride_cd
    tl.store(k_cache_ptr + offsets, k, mask=mask)
    tl.store(v_cache_ptr + offsets, v, mask=mask)


@triton.jit
def load_kv_tile(
    k_head_ptr,
    v_head_ptr,
    table_ptr,
    first_slot,
    end_slot,
    stride_block,
    stride_slot,
    dim_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Keys and values [BLOCK_N, HEAD_DIM_PAD] of slots first_slot .. first_slot + BLOCK_N - 1
    of one sequence and KV head, read straight from the paged cache: slot s lives in block
    table[s // BLOCK_SIZE] at row s % BLOCK_SIZE. `k_head_ptr` / `v_head_ptr` point at the
    head's dims [1, HEAD_DIM_PAD]; both caches share strides and the table row is contiguous.
    Slots >= end_slot read as zero. Returns (k, v, valid)."""
    slots = first_slot + tl.arange(0, BLOCK_N)
    valid = slots < end_slot
    blocks = tl.load(table_ptr + slots // BLOCK_SIZE, mask=valid, other=0)
    offsets = (blocks * stride_block + (slots % BLOCK_SIZE) * stride_slot)[:, None]
    mask = valid[:, None] & dim_ok[None, :]
    k = tl.load(k_head_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(v_head_ptr + offsets, mask=mask, other=0.0)
    return k, v, valid


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The kernels address both caches of a layer with one set of strides."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"key and value caches must share shape and strides, got {tuple(k_cache.shape)} "
            f"{k_cache.stride()} and {tuple(v_cache.shape)} {v_cache.stride()}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"key cache is {k_cache.dtype} but value cache is {v_cache.dtype}")


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values [T, Hkv, D] into flat slots slot_mapping [T] (distinct, in
    range) of the caches [num_blocks, block_size, Hkv, D]; the contract of
    `thinfer.attention.torch_paged.store_kv`. One program copies one token's heads."""
    check_paged_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=1,
    )
