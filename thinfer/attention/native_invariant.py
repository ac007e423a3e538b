"""Batch-invariant attention on the CPU's native decode kernel (the deterministic mode's
backend where the native kernels load).

`kernels/cpu/decode_attention.c` computes each (query row, KV head) on its own: the row's
scores over the first L slots of its block table, an exact softmax over them, the weighted
values, in an order fixed by L alone. Nothing it does for a row depends on the other rows
of the call. Every query row of a step, decode or prefill, goes through it as a "decode"
of its own (`thinfer.attention.native_rows`), so a row's output is bitwise the same alone,
beside other sequences, in a prefill chunk of any size or as a decode, and the same as the
native decoder stack's decode (`thinfer.models.native_stack`), which runs the same kernel;
`check_native_rows` checks the first property at start-up rather than assuming it, and the
tests check both. The default mode's torch backend takes the same path when no column sums
are asked for; the mode differs in how it gets them.

Column sums for compression (H2O's attention received and the like) are not a by-product
of the kernel: when a step's capture asks for them, the rows run once more through
`invariant_paged` (torch, fixed-point sums, invariant too) for the sums only; the outputs
stay the native kernel's. Those steps cost about twice the attention.
"""

from __future__ import annotations

import torch

from thinfer.attention import invariant_paged
from thinfer.attention.metadata import AttentionMetadata
from thinfer.attention.native_rows import native_rows_attention
from thinfer.kernels.cpu_attention import native_decode_attention


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the flat queries q [T, Hq, D] over the cache; returns [T, Hq, D], each row
    independent of the batch (see the module docstring)."""
    out = native_rows_attention(q, k_cache, v_cache, meta, scale)
    capture = meta.capture
    if capture is not None and capture.wants_any_column_sums:
        invariant_paged.paged_attention(q, k_cache, v_cache, meta, scale)  # the sums only
    return out


def check_native_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """RuntimeError unless the native kernel gives a row the same bits alone as beside other
    rows (other sequences, or other rows of its own sequence)."""
    generator = torch.Generator().manual_seed(0)
    block_size, blocks, rows = 16, 24, 9
    cache_shape = (blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator)
    v_cache = torch.randn(cache_shape, generator=generator)
    q = torch.randn(rows, num_heads, head_dim, generator=generator)
    tables = torch.randperm(blocks, generator=generator).view(rows // 3, -1)[:, :8]
    tables = tables.repeat_interleave(3, dim=0).contiguous()
    lengths = torch.tensor([1, 2, 3, 17, 40, 41, 100, 127, 128], dtype=torch.int64)
    batch = native_decode_attention(q, k_cache, v_cache, tables, lengths, 0.125)
    for r in range(rows):
        alone = native_decode_attention(
            q[r : r + 1], k_cache, v_cache, tables[r : r + 1], lengths[r : r + 1], 0.125
        )
        if not torch.equal(alone[0], batch[r]):
            raise RuntimeError(
                "deterministic mode: the native CPU attention gives a row other bits alone "
                "than beside others, so it cannot serve the mode on this build"
            )
