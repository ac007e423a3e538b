# ruff: noqa: ANN001
# Triton reads kernel parameter annotations as type and specialization directives, so the
# @triton.jit function here leaves its parameters unannotated; host functions are typed.
"""SwiGLU activation `silu(gate) * up` over a fused [T, 2I] gate/up projection, in Triton.

The layout is the model's: `MLP.gate_up_proj` writes gate in columns [0, I) and up in [I, 2I).
The kernel computes in float32 and rounds once to the input dtype, so for half dtypes it is
closer to the float32 reference than the model's torch path (which rounds silu(gate) first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_COLUMNS = 1024


def silu_and_mul_reference(gate_up: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """Torch reference in `compute_dtype`, result in gate_up's dtype.

    `compute_dtype=gate_up.dtype` is what the model's MLP computes today; `torch.float32` is
    what the kernel computes.
    """
    gate, up = gate_up.to(compute_dtype).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    in_row_stride,
    out_row_stride,
    intermediate,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_ptrs = gate_up_ptr + row * in_row_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + intermediate, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] (gate first) -> new tensor [..., I], fp32 math."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up's last dimension must be 2 * intermediate, got {width}")
    intermediate = width // 2
    rows = gate_up.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0 and intermediate > 0:
        block = min(BLOCK_COLUMNS, triton.next_power_of_2(intermediate))
        grid = (rows.shape[0], triton.cdiv(intermediate, block))
        _silu_and_mul_kernel[grid](
            rows,
            out,
            rows.stride(0),
            out.stride(0),
            intermediate,
            BLOCK=block,
            num_warps=4,
        )
    return out.view(*gate_up.shape[:-1], intermediate)
