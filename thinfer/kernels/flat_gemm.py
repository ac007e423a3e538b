# ruff: noqa: ANN001
# Triton reads kernel parameter annotations as type and specialization directives, so the
# @triton.jit functions here leave their parameters unannotated; host functions are typed.
"""Decode-time linear layers, y = x W^T (+ b) with few rows: FlashDecoding++'s flat GEMM and
a GEMV, in Triton.

At decode time a linear layer's M (the batch) is 1-64 while N and K are thousands, so the
work is reading W once: a kernel is good when it streams W at the memory bandwidth. cuBLAS
pads M to large tiles; the flat GEMM pads it only to `BLOCK_M` = 16 rows (FlashDecoding++
pads to 8; Triton's `tl.dot` needs at least 16) and spends its tiles on N and K instead:

- `flat_gemm`: one program per (M tile, N tile, K split); its K loop is software-pipelined
  (`num_stages` = 2 is FlashDecoding++'s double buffering: the next W tile loads while the
  current one is multiplied). With `split_k` > 1 the K range is cut into that many slices
  whose fp32 partials are summed afterwards, so a layer with few N tiles still fills the GPU.
- `gemv`: for M <= `GEMV_MAX_ROWS` without `tl.dot`: each program multiplies a [BLOCK_N,
  BLOCK_K] tile of W by each row of x on the vector units and reduces along K (same K
  splitting).

Both accumulate in fp32 and round once to x's dtype, so they match `linear_reference` (fp32
math) to the rounding of the output, not bitwise cuBLAS, whose reduction order differs.
Which one runs for a given layer and M is the dataflow table's choice (`gemm_dataflow.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FLAT_BLOCK_M = 16  # rows per tile: the least `tl.dot` takes
GEMV_MAX_ROWS = 4  # the GEMV loops over x's rows inside a program: only for a few


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) in fp32, rounded to x's dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


@triton.jit
def _flat_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ADD_BIAS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        ks = first + offs_k
        k_ok = ks < k_end
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < M) & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
            mask=(cols[None, :] < N) & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(x, w, acc, input_precision="ieee")
    if ADD_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAX_ROWS: tl.constexpr,
    ADD_BIAS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    for row in tl.static_range(MAX_ROWS):
        if row < M:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for first in range(k_start, k_end, BLOCK_K):
                ks = first + offs_k
                k_ok = ks < k_end
                x = tl.load(x_ptr + row * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(
                    w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
            if ADD_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            out = out_ptr + split * stride_os + row * stride_om + cols
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _check(x: torch.Tensor, weight: torch.Tensor, split_k: int) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    return x.shape[0], weight.shape[0], x.shape[1]


def _k_per_split(k: int, split_k: int, block_k: int) -> int:
    """K columns per split, a multiple of `block_k` (the last split takes what is left)."""
    return triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k


def _outputs(
    m: int, n: int, splits: int, x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, bool]:
    """The kernel's output: y itself (bias added in the kernel) for one split, else fp32
    partials [S, M, N] that `_finish` sums."""
    if splits == 1:
        return torch.empty((1, m, n), dtype=x.dtype, device=x.device), bias is not None
    return torch.empty((splits, m, n), dtype=torch.float32, device=x.device), False


def _finish(
    out: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, bias_added: bool
) -> torch.Tensor:
    """y from the kernel's output: the K splits' partials summed in a fixed order, the bias
    added (unless the kernel did), rounded once."""
    if out.shape[0] == 1 and out.dtype == dtype:
        y = out[0]
        return y if bias is None or bias_added else (y.float() + bias.float()).to(dtype)
    y = out.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def flat_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """y = x [M, K] @ weight [N, K]^T (+ bias) with 16-row tiles; fp32 accumulation."""
    m, n, k = _check(x, weight, split_k)
    x, weight = x.contiguous(), weight.contiguous()
    per_split = _k_per_split(k, split_k, block_k)
    splits = max(1, triton.cdiv(k, per_split))
    out, add_bias = _outputs(m, n, splits, x, bias)
    if m and n and k:
        grid = (triton.cdiv(m, FLAT_BLOCK_M), triton.cdiv(n, block_n), splits)
        _flat_gemm_kernel[grid](
            x, weight, bias if add_bias else x, out, m, n, k, per_split,
            x.stride(0), weight.stride(0), out.stride(1), out.stride(0),
            BLOCK_M=FLAT_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
            ADD_BIAS=add_bias, num_warps=num_warps,
        )  # fmt: skip
    else:
        out.zero_()
        add_bias = False
    return _finish(out, bias, x.dtype, add_bias)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 32,
    block_k: int = 256,
    split_k: int = 1,
    num_warps: int = 4,
) -> torch.Tensor:
    """y = x [M <= GEMV_MAX_ROWS, K] @ weight [N, K]^T (+ bias) on the vector units."""
    m, n, k = _check(x, weight, split_k)
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {m}")
    x, weight = x.contiguous(), weight.contiguous()
    per_split = _k_per_split(k, split_k, block_k)
    splits = max(1, triton.cdiv(k, per_split))
    out, add_bias = _outputs(m, n, splits, x, bias)
    if m and n and k:
        _gemv_kernel[(triton.cdiv(n, block_n), splits)](
            x, weight, bias if add_bias else x, out, m, n, k, per_split,
            x.stride(0), weight.stride(0), out.stride(1), out.stride(0),
            BLOCK_N=block_n, BLOCK_K=block_k, MAX_ROWS=GEMV_MAX_ROWS, ADD_BIAS=add_bias,
            num_warps=num_warps,
        )  # fmt: skip
    else:
        out.zero_()
        add_bias = False
    return _finish(out, bias, x.dtype, add_bias)
