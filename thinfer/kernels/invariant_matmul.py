# ruff: noqa: ANN001
# Triton reads kernel parameter annotations as type and specialization directives, so the
# @triton.jit function here leaves its parameters unannotated; host functions are typed.
"""Batch-invariant linear layers, y = x W^T (+ b), in Triton: each output row is bitwise the
same whatever the number of rows M of the call.

A library GEMM (cuBLAS) picks its algorithm from the shape: for small M it splits the
reduction over K across thread blocks (split-K, stream-K) and sums the partials, for large M
it does not, and tile shapes change with M; each choice sums a row's K products in another
order, so the last bits of a row change with the batch it was computed in. Here nothing
that orders a row's reduction depends on M:

- One program per (M tile, N tile), `BLOCK_M` x `BLOCK_N` outputs, edges masked (rows past
  M and columns past N load zeros and are not stored). No split-K, no stream-K: a program
  owns its outputs' whole reduction.
- The K loop runs k = 0, BLOCK_K, 2 * BLOCK_K, ... in that order, one `tl.dot` per K tile
  accumulating into fp32; the bias is added to the fp32 sum, which is rounded once to x's
  dtype. `BLOCK_K` is fixed (`BLOCK_K` below).
- The tiles (`BLOCK_M`, `BLOCK_N`, `BLOCK_K`, warps, stages) of a call never depend on M
  alone. By default they come from `invariant_config`, a function of N, K and the dtype
  only. A row's K products are summed in K-tile order into an fp32 accumulator, one
  tensor-core instruction per 16 (bf16) columns of K in increasing order, whatever the tile
  shape; whether the hardware's instructions for other tile shapes (mma.sync for 16-row
  tiles, wgmma for 64 rows and more on Hopper) round a row's sums alike is a property of the
  GPU, not of this code, so it is measured, never assumed: `thinfer.kernels.invariant_tiles`
  runs every candidate tile shape on the same operands, keeps only those whose every output
  is bitwise the output of the others, and only then lets the tiles change with M (a
  registered `TilePlan`, per weight shape; the engine tunes one per linear shape at
  start-up). Rows of a tile are independent: what the other rows of a tile hold (data or
  masked zeros) never enters a row's sums.
- M is not specialized on (`do_not_specialize`): Triton would otherwise compile other code
  for M == 1 or M % 16 == 0.

The cost: no split-K means few programs when M and N are small (decode), so the GPU is not
filled; `thinfer bench matmul` measures TFLOPS against cuBLAS per M (the LLM-42 "seed
figure"). The CPU path is `thinfer.models.invariant_linear.tiled_linear`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BLOCK_M = 64  # rows per tile of the default tiles, for every M (see the module docstring)
BLOCK_K = 64  # K per tl.dot of the default tiles
GROUP_M = 8  # tile rows per group of the programs' walk over the output (L2 reuse only)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch configuration of the kernel: a program computes `block_m` x `block_n`
    outputs, reading K in `block_k` steps with `stages` of them in flight, on `warps` warps."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int

    def label(self) -> str:
        """ "64x64x64 w4 s3": block_m x block_n x block_k, warps, stages."""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.warps} s{self.stages}"


def invariant_config(n: int, k: int, dtype: torch.dtype) -> Tiles:
    """The default tiles for a weight [N, K] of `dtype`; M is not an argument on purpose. Wide
    tiles only when N has enough of them to fill the GPU without split-K (N >= 16384:
    lm_head, fused gate/up of large models); 64 columns otherwise."""
    del k, dtype  # the same tiles for every K and dtype (kept in the signature for tuning)
    if n >= 16384:
        return Tiles(BLOCK_M, 128, BLOCK_K, 8, 3)
    return Tiles(BLOCK_M, 64, BLOCK_K, 4, 3)


# Tile plans per (N, K, dtype, device): ((largest M, tiles), ...) in increasing M, every tiles
# verified to give each output the same bits (`thinfer.kernels.invariant_tiles.tune_tiles`).
_PLANS: dict[tuple[int, int, torch.dtype, str], tuple[tuple[int, Tiles], ...]] = {}


def _plan_key(n: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple:
    return (n, k, dtype, str(device))


def register_plan(weight: torch.Tensor, plan: tuple[tuple[int, Tiles], ...] | None) -> None:
    """Use `plan` (M buckets in increasing order, each with its tiles; the last covers every
    larger M) for every call with a weight of `weight`'s shape, dtype and device; None drops
    it. The caller vouches that the plan's tiles give bitwise the same outputs."""
    key = _plan_key(*weight.shape, weight.dtype, weight.device)
    if plan is None:
        _PLANS.pop(key, None)
        return
    if not plan or any(a[0] >= b[0] for a, b in zip(plan, plan[1:])):
        raise ValueError(f"a tile plan needs M buckets in increasing order, got {plan}")
    _PLANS[key] = plan


def registered_plan(weight: torch.Tensor) -> tuple[tuple[int, Tiles], ...] | None:
    """The plan registered for `weight`'s shape, dtype and device, or None."""
    return _PLANS.get(_plan_key(*weight.shape, weight.dtype, weight.device))


def tiles_for(weight: torch.Tensor, m: int) -> Tiles:
    """The tiles a call of M rows with `weight` runs: the registered plan's bucket for M, or
    the default `invariant_config`."""
    plan = registered_plan(weight)
    if plan is None:
        return invariant_config(*weight.shape, weight.dtype)
    return next((tiles for top, tiles in plan if m <= top), plan[-1][1])


def invariant_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) in float64, rounded once to x's dtype."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


@triton.jit(do_not_specialize=["M"])
def _invariant_matmul_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_om,
    stride_xb,
    stride_wb,
    stride_ob,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    GROUP_M: tl.constexpr,
    ADD_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # Programs walk the output in groups of GROUP_M tile rows (column by column inside a
    # group), so tiles running together share their weight columns in L2. The order of the
    # programs never enters a sum.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    batch = tl.program_id(1).to(tl.int64)  # bmm: one matrix product per batch entry
    x_rows = x_ptr + batch * stride_xb + rows[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + batch * stride_wb + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K tiles in increasing order, one tl.dot each: the same order for every row and M.
    for first in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = first + offs_k
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            w_cols + ks[:, None] * stride_wk, mask=col_ok[None, :] & k_ok[:, None], other=0.0
        )
        if INTERPRETED:  # numpy: the same sum for every output, wherever it sits
            x, w = x.to(tl.float32), w.to(tl.float32)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        else:
            acc = tl.dot(x, w, acc, input_precision="ieee")
    if ADD_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + batch * stride_ob + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def kernels_interpreted() -> bool:
    """True when Triton interprets this module's kernel (TRITON_INTERPRET=1 was set before
    the import): it then runs on CPU tensors too, slowly; otherwise it needs CUDA."""
    return isinstance(_invariant_matmul_kernel, InterpretedFunction)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """ValueError unless x [M, K], weight [N, K] and bias [N] fit together and the kernel."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"expected bias [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"x is {x.dtype} but bias is {bias.dtype}")
    tensors = [x, weight] if bias is None else [x, weight, bias]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"x, weight and bias must be on one device, got {x.device} and others")
    if x.device.type != "cuda" and not kernels_interpreted():
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (on CPU: TRITON_INTERPRET=1), got {x.device}"
        )


def invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """y = x [M, K] @ weight [N, K]^T (+ bias), each row bitwise independent of M.

    fp32 accumulation in a fixed K order, rounded once to x's dtype (see the module
    docstring). `tiles`: this launch's configuration (default: `tiles_for(weight, M)`, the
    registered plan or the default tiles). ValueError for operands that do not fit (shapes,
    dtypes, devices). Interpreted (CPU), a K tile's products are summed as broadcast fp32
    products, not by `tl.dot`: the interpreter runs `tl.dot` as numpy's BLAS matmul, whose
    result for a row depends on its place in the tile (and whose bf16 products Triton 3.9
    gets wrong: errors of 1e10 on unit-size data). On CUDA `tl.dot` runs on the tensor
    cores, where a row's bits do not depend on its place (measured on an H200 across 19
    tile shapes: `thinfer bench matmul`, "classes").
    """
    _check(x, weight, bias)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    x, weight = x.contiguous(), weight.contiguous()
    tiles = tiles_for(weight, m) if tiles is None else tiles
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    _invariant_matmul_kernel[grid](
        x, weight, x if bias is None else bias.contiguous(), out, m, n, k,
        x.stride(0), weight.stride(0), 1, out.stride(0), 0, 0, 0,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        NUM_STAGES=tiles.stages, GROUP_M=GROUP_M, ADD_BIAS=bias is not None,
        INTERPRETED=kernels_interpreted(),
        num_warps=tiles.warps,
    )  # fmt: skip
    return out


# The fixed tiles of `invariant_bmm` (attention's per-row products: a few query heads per
# KV head against hundreds to thousands of keys).
BMM_TILES = Tiles(16, 64, 64, 4, 3)


def invariant_bmm(a: torch.Tensor, b_nk: torch.Tensor) -> torch.Tensor:
    """out[i] = a[i] [M, K] @ b_nk[i]^T for a [B, M, K] and b_nk [B or 1, N, K] (any strides,
    a batch of 1 shared by every i): each out[i] bitwise independent of B and of the other
    entries (fixed tiles `BMM_TILES`, fixed K order, no split-K). fp32 accumulation, rounded
    once to a's dtype. ValueError for operands that do not fit."""
    if a.dim() != 3 or b_nk.dim() != 3 or a.shape[2] != b_nk.shape[2]:
        raise ValueError(
            f"expected a [B, M, K] and b [B, N, K], got {tuple(a.shape)} and {tuple(b_nk.shape)}"
        )
    if b_nk.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"b's batch must be 1 or {a.shape[0]}, got {b_nk.shape[0]}")
    _check(a[0], b_nk[0], None)
    batch, m, k = a.shape
    n = b_nk.shape[1]
    out = torch.empty((batch, m, n), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    a = a if a.stride(2) == 1 else a.contiguous()
    tiles = BMM_TILES
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n), batch)
    _invariant_matmul_kernel[grid](
        a, b_nk, a, out, m, n, k,
        a.stride(1), b_nk.stride(1), b_nk.stride(2), out.stride(1),
        a.stride(0), 0 if b_nk.shape[0] == 1 else b_nk.stride(0), out.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        NUM_STAGES=tiles.stages, GROUP_M=GROUP_M, ADD_BIAS=False,
        INTERPRETED=kernels_interpreted(),
        num_warps=tiles.warps,
    )  # fmt: skip
    return out
