"""Attention over the paged KV cache with Triton kernels (the GPU backend).

Same contract as `thinfer.attention.torch_paged`: `store_kv` writes a step's keys and values
into their slots, `paged_attention` attends the flat batch (decodes first, one row each, then
prefill chunks). All decodes go through one split-KV decode kernel and all prefill chunks
through one paged prefill kernel, whatever their lengths (the torch backend's decode groups are
a CPU padding optimisation of that backend's own).

Sequences whose attention column sums a compression policy asked for (`meta.capture`, rare)
are computed by the torch backend's functions instead, so their signals are recorded exactly
as the torch backend records them; the kernels skip (prefill) or overwrite (decode) them.

A step of decodes only, without capture, goes through `decode_attention`, which reads only
the metadata's tensors and launches a grid that depends only on their shapes: it never
syncs with the host, so it can be captured in a CUDA graph (`thinfer.engine.decode_graphs`).
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

from thinfer.attention import torch_paged
from thinfer.attention.capture import AttentionCapture, sum_query_groups
from thinfer.attention.metadata import AttentionMetadata
from thinfer.kernels import store_kv as store_kv_kernels
from thinfer.kernels.decode_attention import paged_decode_attention
from thinfer.kernels.prefill_attention import paged_prefill_attention

store_kv = store_kv_kernels.store_kv


def kernels_interpreted() -> bool:
    """True when Triton interprets the kernels (TRITON_INTERPRET=1 was set before they were
    imported): they then run on CPU tensors too, slowly; otherwise they need CUDA."""
    return isinstance(store_kv_kernels._store_kv_kernel, InterpretedFunction)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the flat queries q [T, Hq, D] over the cache; returns [T, Hq, D].

    Decodes use `paged_decode_attention`, prefill chunks `paged_prefill_attention`. A
    sequence for which `meta.capture` wants column sums is computed with the torch backend's
    functions, which also record its column sums.
    """
    if meta.num_decodes == meta.num_seqs and meta.capture is None:
        return decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    capture = meta.capture
    captured = {i for i in range(meta.num_seqs) if capture and capture.wants_column_sums(i)}
    num_decodes = meta.num_decodes
    if num_decodes:
        out[:num_decodes] = paged_decode_attention(
            q[:num_decodes],
            k_cache,
            v_cache,
            meta.block_tables[:num_decodes],
            meta.context_lens[:num_decodes],
            scale,
        )
    if num_decodes < meta.num_seqs:
        first_row = meta.query_starts_list[num_decodes]
        starts, lens, max_len = meta.plan(prefill_layout)
        if max_len:
            out[first_row:] = paged_prefill_attention(
                q[first_row:],
                k_cache,
                v_cache,
                meta.block_tables[num_decodes:],
                starts,
                lens,
                meta.context_lens[num_decodes:],
                scale,
                max_len,
            )
    for i in sorted(captured):
        _attend_with_column_sums(q, k_cache, v_cache, meta, scale, i, out)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of a step of decodes only (one query row per sequence, no capture).

    Graph-safe: reads `meta.block_tables` and `meta.context_lens` on the device, never the
    host-side lists, and the kernels' grid depends only on q's and the block table's shapes
    (a fixed split size, see `paged_decode_attention`).
    """
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)


def prefill_layout(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query starts (relative to the first prefill row) and lengths [num_prefills] on the
    device, with length 0 for sequences whose column sums are captured (the torch functions
    compute those), and the largest length: this backend's per-step plan, built by the first
    layer through `AttentionMetadata.plan` and reused by the others."""
    first, capture = meta.num_decodes, meta.capture
    base = meta.query_starts_list[first]
    starts = [meta.query_starts_list[i] - base for i in range(first, meta.num_seqs)]
    lens = [
        0 if capture and capture.wants_column_sums(i) else meta.query_lens_list[i]
        for i in range(first, meta.num_seqs)
    ]
    device = meta.block_tables.device
    return (
        torch.tensor(starts, dtype=torch.int64, device=device),
        torch.tensor(lens, dtype=torch.int64, device=device),
        max(lens),
    )


def _attend_with_column_sums(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    index: int,
    out: torch.Tensor,
) -> None:
    """Sequence `index` through the torch backend's functions: its output rows into `out`
    and its column sums into `meta.capture`, as `torch_paged.paged_attention` does."""
    capture: AttentionCapture = meta.capture  # type: ignore[assignment]
    num_kv_heads = k_cache.shape[2]
    context_len = meta.context_lens_list[index]
    table = meta.block_tables[index]
    if index < meta.num_decodes:
        row, probs = torch_paged.decode_attention_with_probs(
            q[index : index + 1],
            k_cache,
            v_cache,
            table[None],
            meta.context_lens[index : index + 1],
            context_len,
            scale,
        )
        out[index] = row[0]
        column = torch_paged.decode_column_sums(
            probs[0], context_len, capture.first_counted_slot(index), capture.exclude_self
        )
        capture.add_column_sums(index, sum_query_groups(column, num_kv_heads))
        return
    start, n = meta.query_starts_list[index], meta.query_lens_list[index]
    keys = torch_paged.gather_kv(k_cache, table, context_len)
    values = torch_paged.gather_kv(v_cache, table, context_len)
    queries = q[start : start + n]
    out[start : start + n] = torch_paged.prefill_attention(queries, keys, values, scale)
    sums = torch_paged.prefill_column_sums(
        queries, keys, scale, capture.first_counted_slot(index), capture.exclude_self
    )
    capture.add_column_sums(index, sum_query_groups(sums, num_kv_heads))
