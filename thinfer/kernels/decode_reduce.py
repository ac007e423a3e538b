# Triton kernel arguments are pointers, scalars and constexprs, typed by Triton at launch.
# ruff: noqa: ANN001, ANN201
"""Stage 2 of paged decode attention: combine a sequence's per-chunk partial softmaxes.

Stage 1 (`thinfer.kernels.decode_attention`) leaves, per (sequence, query head, chunk), the
sum of p * v, the sum of p and the log2-unit offset p was taken against. Chunks are combined
in order, reading only those that hold keys, so the result never depends on the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_MIN_DOT_ROWS = 16


@triton.jit
def _decode_reduce_kernel(
    acc_ptr,
    sum_ptr,
    max_ptr,
    context_lens_ptr,
    out_ptr,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    used = (context_len + SPLIT_TOKENS - 1) // SPLIT_TOKENS
    first = (seq * num_heads + head) * num_splits
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    # Chunks are read in order, only those holding keys: the same order whatever the batch.
    top = tl.load(max_ptr + first)
    for split in range(1, used):
        top = tl.maximum(top, tl.load(max_ptr + first + split))
    weight = tl.exp2(tl.load(max_ptr + first) - top)
    total = tl.load(sum_ptr + first) * weight
    acc = tl.load(acc_ptr + first * HEAD_DIM + dims, mask=dim_ok, other=0.0) * weight
    for split in range(1, used):
        weight = tl.exp2(tl.load(max_ptr + first + split) - top)
        total += tl.load(sum_ptr + first + split) * weight
        acc += tl.load(acc_ptr + (first + split) * HEAD_DIM + dims, mask=dim_ok, other=0.0) * weight
    out = acc / total
    out_row = out_ptr + (seq * num_heads + head) * HEAD_DIM
    tl.store(out_row + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


class DecodePartials(NamedTuple):
    """Stage-1 results per (sequence, query head, chunk): `acc` [B, Hq, S, D] = sum of
    p * v, `sums` [B, Hq, S] = sum of p, `maxima` [B, Hq, S] = the log2-unit offset p was
    taken against (phi for a unified chunk, the running max after a fallback, -inf for an
    empty chunk). All fp32."""

    acc: torch.Tensor
    sums: torch.Tensor
    maxima: torch.Tensor


def combine_decode_partials(
    partials: DecodePartials,
    context_lens: torch.Tensor,
    split_tokens: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Stage 2: out[b, h] = sum_s acc * 2^(m_s - M) / sum_s sum * 2^(m_s - M), M = max_s m_s,
    over the chunks that hold keys of sequence b (all weights are 1 when every chunk used
    the unified max)."""
    batch, num_heads, num_splits, head_dim = partials.acc.shape
    out = torch.empty(batch, num_heads, head_dim, dtype=out_dtype, device=partials.acc.device)
    _decode_reduce_kernel[(batch, num_heads)](
        partials.acc,
        partials.sums,
        partials.maxima,
        context_lens,
        out,
        num_heads,
        num_splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(head_dim)),
        SPLIT_TOKENS=split_tokens,
        num_warps=1,
    )
    return out
