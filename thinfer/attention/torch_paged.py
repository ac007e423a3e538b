"""Attention over the paged KV cache in plain torch.

This is the CPU backend and the ground truth that GPU kernels are tested against. The cache
of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]; a
sequence's slot s lives in block `block_table[s // block_size]` at offset `s % block_size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thinfer.attention.metadata import AttentionMetadata


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values [T, Hkv, D] into their flat slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` slots of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.view(-1, cache.shape[2], cache.shape[3])[:length]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the flat queries q [T, Hq, D] over the cache; returns [T, Hq, D]."""
    out = torch.empty_like(q)
    for start, end in meta.decode_groups:
        out[start:end] = decode_attention(
            q[start:end],
            k_cache,
            v_cache,
            meta.block_tables[start:end],
            meta.context_lens[start:end],
            max(meta.context_lens_list[start:end]),
            scale,
        )
    for i in range(meta.num_decodes, meta.num_seqs):
        start, n = meta.query_starts_list[i], meta.query_lens_list[i]
        out[start : start + n] = prefill_attention(
            q[start : start + n],
            gather_kv(k_cache, meta.block_tables[i], meta.context_lens_list[i]),
            gather_kv(v_cache, meta.block_tables[i], meta.context_lens_list[i]),
            scale,
        )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], attending to its first context_lens[b] slots."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = (max_context_len + block_size - 1) // block_size
    # index_select on the flat table is ~3x faster on CPU than advanced indexing.
    tables = block_tables[:, :num_blocks].reshape(-1)
    keys = k_cache.index_select(0, tables).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, tables).view(batch, -1, num_kv_heads, head_dim)
    values = values.transpose(1, 2)
    slots = torch.arange(keys.shape[2], device=q.device)
    valid = slots[None, :] < context_lens[:, None]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys,
        values,
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0]


def prefill_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """n new queries [n, Hq, D] over keys/values [c, Hkv, D] whose last n are the new tokens.

    Query i may see key j when j <= c - n + i (causal, aligned at the end).
    """
    n, c = q.shape[0], keys.shape[0]
    query_slots = torch.arange(c - n, c, device=q.device)
    allowed = torch.arange(c, device=q.device)[None, :] <= query_slots[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.transpose(0, 1),
        values.transpose(0, 1),
        attn_mask=allowed,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
