"""Decode attention over the paged KV cache on the C kernel of `cpu/decode_attention.c`:
keys and values are read in their blocks, never gathered into a copy, and nothing is
allocated per step beyond the output. fp32 CPU tensors only; `torch_paged.decode_attention`
is the reference it matches within fp32 rounding (summation order, expf)."""

from __future__ import annotations

import torch

from thinfer.kernels.cpu_native import native_library


def native_decode_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when `native_decode_attention` can run these tensors here."""
    return (
        q.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and q.device.type == "cpu"
        and native_library() is not None
    )


def native_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    table_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row, q [B, Hq, D] (rows may be strided: views of a fused projection),
    over the first context_lens[b] cached slots (caches [num_blocks, block_size, Hkv, D]) of
    row table_rows[b] of block_tables [S, W] int64 (table_rows None: row b, S == B)
    -> [B, Hq, D]. Each row is computed on its own, in an order fixed by its length: a row's
    bits do not depend on the others."""
    library = native_library()
    if library is None:
        raise RuntimeError("the native CPU kernels are unavailable here (see cpu_native)")
    batch, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    if q_heads % kv_heads or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"decode attention: q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lengths = context_lens.to(torch.int64).contiguous()
    if lengths.shape != (batch,) or (table_rows is None and tables.shape[0] != batch):
        raise ValueError(f"decode attention: {batch} rows, lengths {tuple(lengths.shape)}")
    rows = None if table_rows is None else table_rows.to(torch.int64).contiguous()
    if rows is not None and rows.shape != (batch,):
        raise ValueError(f"decode attention: {batch} rows, table rows {tuple(rows.shape)}")
    out = torch.empty(batch, q_heads, head_dim)
    library.paged_decode_attention(
        *(q.data_ptr(), q.stride(0), batch, q_heads, kv_heads, head_dim),
        *(k_cache.data_ptr(), v_cache.data_ptr(), block_size, tables.data_ptr(), tables.shape[1]),
        *(None if rows is None else rows.data_ptr(), lengths.data_ptr(), scale, out.data_ptr()),
    )
    return out
