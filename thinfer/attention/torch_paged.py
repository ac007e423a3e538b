"""Attention over the paged KV cache in plain torch.

This is the CPU backend and the ground truth that GPU kernels are tested against. In fp32 on a
CPU that runs the native kernels, a step whose column sums no compression method records
goes through the native decode kernel, every row, decode or prefill, as a decode of its own
(`thinfer.attention.native_rows`: one C call, the blocks read in place; `decode_attention`
and `prefill_attention` here are its references); in a step that records them, the decodes
that record none still do. The cache
of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]; a
sequence's slot s lives in block `block_table[s // block_size]` at offset `s % block_size`.

Decodes attend in length groups (`plan_decode_groups`, this backend's per-step plan): each
group is padded to its longest member, so on CPU a few groups waste less than one padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thinfer.attention.capture import sum_query_groups
from thinfer.attention.metadata import AttentionMetadata
from thinfer.attention.native_rows import native_rows_attention
from thinfer.kernels.cpu_attention import native_decode_applies, native_decode_attention

# Query rows per chunk when prefill column sums are computed explicitly (bounds memory).
COLUMN_SUM_CHUNK = 256
# Cost of one more attention call per layer, in padded (sequence x slot) units: measured on
# the dev CPU, a call costs about as much as gathering and attending ~256 extra slots.
GROUP_OVERHEAD_SLOTS = 256
MAX_DECODE_GROUPS = 4


def plan_decode_groups(context_lens: list[int]) -> list[tuple[int, int]]:
    """Split decodes sorted by ascending context length into contiguous [start, end) groups.

    Each group is padded to its longest member; a split is made where it saves more padded
    slots than `GROUP_OVERHEAD_SLOTS` (greedy, at most `MAX_DECODE_GROUPS` groups).
    """
    if not context_lens:
        return []
    groups = [(0, len(context_lens))]
    while len(groups) < MAX_DECODE_GROUPS:
        best_saving, best = GROUP_OVERHEAD_SLOTS, None
        for index, (start, end) in enumerate(groups):
            longest = context_lens[end - 1]
            for split in range(start + 1, end):
                saving = (split - start) * (longest - context_lens[split - 1])
                if saving > best_saving:
                    best_saving, best = saving, (index, split)
        if best is None:
            break
        index, split = best
        start, end = groups[index]
        groups[index : index + 1] = [(start, split), (split, end)]
    return groups


def decode_groups(meta: AttentionMetadata) -> list[tuple[int, int]]:
    """The step's decode groups (a plan builder for `AttentionMetadata.plan`)."""
    return plan_decode_groups(meta.context_lens_list[: meta.num_decodes])


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
    """Attention of the flat queries q [T, Hq, D] over the cache; returns [T, Hq, D].

    When `meta.capture` asks for them, the column sums of the attention probabilities of
    some sequences are recorded on the way (see `thinfer.attention.capture`).
    """
    capture = meta.capture
    if native_decode_applies(q, k_cache) and not (capture and capture.wants_any_column_sums):
        return native_rows_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    num_kv_heads = k_cache.shape[2]
    decodes = meta.num_decodes
    native = (
        decodes > 0
        and native_decode_applies(q, k_cache)
        and not (capture and any(capture.wants_column_sums(i) for i in range(decodes)))
    )
    if native:  # all decodes at once, reading the blocks in place
        out[:decodes] = native_decode_attention(
            q[:decodes],
            k_cache,
            v_cache,
            meta.block_tables[:decodes],
            meta.context_lens[:decodes],
            scale,
        )
    for start, end in [] if native else meta.plan(decode_groups):
        args = (
            q[start:end],
            k_cache,
            v_cache,
            meta.block_tables[start:end],
            meta.context_lens[start:end],
            max(meta.context_lens_list[start:end]),
            scale,
        )
        wanted = [i for i in range(start, end) if capture and capture.wants_column_sums(i)]
        if not wanted:
            out[start:end] = decode_attention(*args)
            continue
        out[start:end], probs = decode_attention_with_probs(*args)
        for i in wanted:
            column = decode_column_sums(
                probs[i - start],
                meta.context_lens_list[i],
                capture.first_counted_slot(i),  # type: ignore[union-attr]
                capture.exclude_self,  # type: ignore[union-attr]
            )
            capture.add_column_sums(i, sum_query_groups(column, num_kv_heads))  # type: ignore[union-attr]
    for i in range(meta.num_decodes, meta.num_seqs):
        start, n = meta.query_starts_list[i], meta.query_lens_list[i]
        keys = gather_kv(k_cache, meta.block_tables[i], meta.context_lens_list[i])
        values = gather_kv(v_cache, meta.block_tables[i], meta.context_lens_list[i])
        out[start : start + n] = prefill_attention(q[start : start + n], keys, values, scale)
        if capture is not None and capture.wants_column_sums(i):
            sums = prefill_column_sums(
                q[start : start + n],
                keys,
                scale,
                capture.first_counted_slot(i),
                capture.exclude_self,
            )
            capture.add_column_sums(i, sum_query_groups(sums, num_kv_heads))
    return out


def _gather_decode_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values [B, Hkv, S, D] of each sequence's blocks (S padded to whole blocks)
    and the mask [B, S] of slots below each context length."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    batch = block_tables.shape[0]
    num_blocks = (max_context_len + block_size - 1) // block_size
    # index_select on the flat table is ~3x faster on CPU than advanced indexing.
    tables = block_tables[:, :num_blocks].reshape(-1)
    keys = k_cache.index_select(0, tables).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, tables).view(batch, -1, num_kv_heads, head_dim)
    slots = torch.arange(keys.shape[2], device=k_cache.device)
    valid = slots[None, :] < context_lens[:, None]
    return keys, values.transpose(1, 2), valid


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
    keys, values, valid = _gather_decode_kv(
        k_cache, v_cache, block_tables, context_lens, max_context_len
    )
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys,
        values,
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0]


def decode_attention_with_probs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_attention` computed explicitly, also returning the probabilities
    [B, Hq, S] (zero beyond each context length) that H2O accumulates."""
    batch, num_heads, head_dim = q.shape
    keys, values, valid = _gather_decode_kv(
        k_cache, v_cache, block_tables, context_lens, max_context_len
    )
    num_kv_heads = keys.shape[1]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    logits = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    logits.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, values.float()).to(q.dtype)  # [B, Hkv, G, D]
    return out.view(batch, num_heads, head_dim), probs.view(batch, num_heads, -1)


def decode_column_sums(
    probs: torch.Tensor, context_len: int, first_counted_slot: int = 0, exclude_self: bool = False
) -> torch.Tensor:
    """One decode query's probabilities [Hq, S] as column sums [Hq, context_len]: zero when
    its slot (context_len - 1) is below `first_counted_slot`; its own column zeroed with
    `exclude_self`."""
    column = probs[:, :context_len]
    if context_len - 1 < first_counted_slot:
        return torch.zeros_like(column)
    if exclude_self:
        column = column.clone()
        column[:, context_len - 1] = 0
    return column


def prefill_column_sums(
    q: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    first_counted_slot: int = 0,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Attention probability each key receives, summed over the n new queries: [Hq, c].

    Same causal alignment as `prefill_attention` (query i sits in slot c - n + i). Only
    queries in slots >= `first_counted_slot` count; with `exclude_self` the probability a
    query gives its own key is left out (after the softmax, so the others are unchanged).
    Computed COLUMN_SUM_CHUNK queries at a time so a long prompt never needs its whole
    n x c matrix at once.
    """
    n, c = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    keys_per_head = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, c, D]
    sums = torch.zeros(q.shape[1], c, dtype=torch.float32, device=q.device)
    columns = torch.arange(c, device=q.device)
    for row in range(max(0, first_counted_slot - (c - n)), n, COLUMN_SUM_CHUNK):
        chunk = q[row : row + COLUMN_SUM_CHUNK].float().transpose(0, 1)  # [Hq, m, D]
        query_slots = torch.arange(c - n + row, c - n + row + chunk.shape[1], device=q.device)
        logits = torch.matmul(chunk, keys_per_head.transpose(-1, -2)) * scale  # [Hq, m, c]
        logits.masked_fill_(columns[None, :] > query_slots[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if exclude_self:
            probs[:, torch.arange(chunk.shape[1], device=q.device), query_slots] = 0
        sums += probs.sum(1)
    return sums


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
