# ruff: noqa: ANN001
# Triton reads kernel parameter annotations as type and specialization directives, so the
# @triton.jit function here leaves its parameters unannotated; host functions are typed.
"""In-place rotary embedding of q and k (HF rotate-half layout) as one Triton kernel.

One program per token reads that token's cos/sin rows from RotaryEmbedding's tables by its
absolute position, then rotates every query and key head of the token. Invariant (from
`thinfer.models.rope`): keys are rotated at their absolute position *before* they are cached,
so this runs on a step's fresh q/k, never on cached keys.

Each output element is computed in float32 from the stored inputs and rounded once, so for half
dtypes it can differ from the torch path (which rounds each product) by about one unit in the
last place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: rotate-half RoPE with the angles gathered at `positions`.

    The same arithmetic as `thinfer.models.rope.rotate` (tests hold them bitwise equal); kernels
    sit below models in the layers, so the reference carries its own copy.
    """
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@triton.jit
def _rotate_heads(
    base_ptr,
    head_stride,
    num_heads,
    cos_first,
    cos_second,
    sin_first,
    sin_second,
    half_cols,
    half_dim,
    BLOCK_HEADS: tl.constexpr,
):
    """Rotate all heads of one token in place: [x1, x2] -> [x1*c1 - x2*s1, x2*c2 + x1*s2]."""
    heads = tl.arange(0, BLOCK_HEADS)
    mask = (heads[:, None] < num_heads) & (half_cols[None, :] < half_dim)
    first_ptrs = base_ptr + heads[:, None] * head_stride + half_cols[None, :]
    second_ptrs = first_ptrs + half_dim
    first = tl.load(first_ptrs, mask=mask, other=0.0)
    second = tl.load(second_ptrs, mask=mask, other=0.0)
    first_f, second_f = first.to(tl.float32), second.to(tl.float32)
    rotated_first = first_f * cos_first[None, :] - second_f * sin_first[None, :]
    rotated_second = second_f * cos_second[None, :] + first_f * sin_second[None, :]
    tl.store(first_ptrs, rotated_first.to(first.dtype), mask=mask)
    tl.store(second_ptrs, rotated_second.to(first.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    table_row_stride,
    num_q_heads,
    num_k_heads,
    half_dim,
    BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    half_cols = tl.arange(0, BLOCK_HALF)
    col_mask = half_cols < half_dim
    cos_row = cos_ptr + position * table_row_stride
    sin_row = sin_ptr + position * table_row_stride
    cos_first = tl.load(cos_row + half_cols, mask=col_mask, other=0.0).to(tl.float32)
    cos_second = tl.load(cos_row + half_dim + half_cols, mask=col_mask, other=0.0).to(tl.float32)
    sin_first = tl.load(sin_row + half_cols, mask=col_mask, other=0.0).to(tl.float32)
    sin_second = tl.load(sin_row + half_dim + half_cols, mask=col_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * q_token_stride,
        q_head_stride,
        num_q_heads,
        cos_first,
        cos_second,
        sin_first,
        sin_second,
        half_cols,
        half_dim,
        BLOCK_Q_HEADS,
    )
    _rotate_heads(
        k_ptr + token * k_token_stride,
        k_head_stride,
        num_k_heads,
        cos_first,
        cos_second,
        sin_first,
        sin_second,
        half_cols,
        half_dim,
        BLOCK_K_HEADS,
    )


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, D]")
    head_dim = q.shape[2]
    if head_dim % 2:
        raise ValueError(f"rotate-half needs an even head_dim, got {head_dim}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(
            "q and k must have a contiguous last dimension (they are rotated in place)"
        )
    if k.dtype != q.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from k dtype {k.dtype}")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [T] int32/int64, got {tuple(positions.shape)}")
    if not positions.device == cos_table.device == sin_table.device == q.device == k.device:
        raise ValueError("q, k, positions and the cos/sin tables must share one device")
    for table in (cos_table, sin_table):
        if table.dim() != 2 or table.shape[1] != head_dim or table.stride(1) != 1:
            raise ValueError(f"cos/sin tables must be [P, {head_dim}] with contiguous rows")
    if cos_table.stride(0) != sin_table.stride(0):
        raise ValueError("cos and sin tables must share one row stride")


def apply_rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by the tables' rows at `positions` [T].

    q and k may be strided views (e.g. slices of one fused qkv projection) as long as their last
    dimension is contiguous. `cos_table`/`sin_table` [P, D] are `RotaryEmbedding.cos/sin`. Every
    position must be < P: it is not checked on the device (that would cost a host sync).
    """
    _check(q, k, positions, cos_table, sin_table)
    tokens, num_q_heads, head_dim = q.shape
    if tokens == 0:
        return
    half_dim = head_dim // 2
    block_q_heads = triton.next_power_of_2(num_q_heads)
    num_warps = 4 if block_q_heads * triton.next_power_of_2(half_dim) >= 2048 else 1
    _rope_kernel[(tokens,)](
        q,
        k,
        positions,
        cos_table,
        sin_table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_table.stride(0),
        num_q_heads,
        k.shape[1],
        half_dim,
        BLOCK_HALF=triton.next_power_of_2(half_dim),
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
        num_warps=num_warps,
    )
