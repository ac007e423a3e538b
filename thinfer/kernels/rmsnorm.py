# ruff: noqa: ANN001
# Triton reads kernel parameter annotations as type and specialization directives, so the
# @triton.jit functions here leave their parameters unannotated; host functions are typed.
"""RMSNorm and residual-add + RMSNorm as one-pass Triton kernels, with torch references.

Numerics match `thinfer.models.llama.RMSNorm`: the statistic is taken in float32; for half
dtypes the normalized row is rounded to the input dtype *before* it is scaled by the weight,
and that product is rounded again (`weight * (xf * rsqrt(mean(xf^2) + eps)).to(dtype)`). The
product of two half values is exact in float32, so that second rounding is the one torch does.
For float32 inputs the two roundings are no-ops, as in `F.rms_norm`.

The fused variant adds first and normalizes the *rounded* sum, so `normed` equals the module
applied to the new residual stream, which is what a pre-norm decoder layer feeds its next block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program owns one whole row in registers; rows wider than this would spill.
MAX_FUSED_HIDDEN = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference: exactly what thinfer's RMSNorm module computes on x [..., H]."""
    if x.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (RMSNorm(residual + x), residual + x), the sum in x's dtype."""
    new_residual = residual + x
    return rms_norm_reference(new_residual, weight, eps), new_residual


@triton.jit
def _rms_norm_row(row, weight_ptr, cols, mask, hidden, eps):
    """Normalize one float32 row (masked lanes hold 0) and scale it, rounding like RMSNorm."""
    mean_square = tl.sum(row * row, axis=0) / hidden
    normed = row * tl.rsqrt(mean_square + eps)
    out_dtype = weight_ptr.dtype.element_ty
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return weight * normed.to(out_dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    x_row_stride,
    out_row_stride,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row_index = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    row = tl.load(x_ptr + row_index * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = _rms_norm_row(row, weight_ptr, cols, mask, hidden, eps)
    tl.store(out_ptr + row_index * out_row_stride + cols, out, mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    out_ptr,
    residual_out_ptr,
    weight_ptr,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row_index = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row_index * x_row_stride + cols, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + row_index * residual_row_stride + cols, mask=mask, other=0.0)
    # Round the sum to the stream dtype first: the next layer reads the rounded value.
    summed = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    tl.store(residual_out_ptr + row_index * out_row_stride + cols, summed, mask=mask)
    out = _rms_norm_row(summed.to(tl.float32), weight_ptr, cols, mask, hidden, eps)
    tl.store(out_ptr + row_index * out_row_stride + cols, out, mask=mask)


def _launch_config(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `hidden` elements: the whole row in one block."""
    if hidden > MAX_FUSED_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds the fused kernel's {MAX_FUSED_HIDDEN}")
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // 256, 1), 16)


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """View t [..., hidden] as rows [N, hidden] with unit column stride (copying only if not)."""
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    return hidden


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H] by weight [H] (same dtype as x) in one Triton pass; new tensor."""
    hidden = _check(x, weight)
    rows = _as_rows(x, hidden)
    out = torch.empty((rows.shape[0], hidden), dtype=x.dtype, device=x.device)
    if rows.shape[0] > 0:
        block, num_warps = _launch_config(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            out,
            weight.contiguous(),
            rows.stride(0),
            out.stride(0),
            hidden,
            eps,
            BLOCK=block,
            num_warps=num_warps,
        )
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x) for x, residual [..., H] in one pass.

    Both results are new tensors; the inputs are only read. Used as `normed, stream =
    fused_add_rms_norm(block_output, stream, norm.weight, norm.eps)` between decoder blocks.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)}/{residual.dtype} does not match "
            f"x {tuple(x.shape)}/{x.dtype}"
        )
    hidden = _check(x, weight)
    x_rows, residual_rows = _as_rows(x, hidden), _as_rows(residual, hidden)
    out = torch.empty((x_rows.shape[0], hidden), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out)
    if x_rows.shape[0] > 0:
        block, num_warps = _launch_config(hidden)
        _fused_add_rms_norm_kernel[(x_rows.shape[0],)](
            x_rows,
            residual_rows,
            out,
            residual_out,
            weight.contiguous(),
            x_rows.stride(0),
            residual_rows.stride(0),
            out.stride(0),
            hidden,
            eps,
            BLOCK=block,
            num_warps=num_warps,
        )
    return out.view(x.shape), residual_out.view(x.shape)
