"""The decoder's small per-layer ops on the C kernels of `cpu/layer_ops.c` (fp32, CPU).

Each function does in one native call what the torch path (`thinfer.models.fused.LayerOps`)
does in several ops, with the same arithmetic up to fp32 summation order (RMSNorm) and the
last bits of exp (SiLU, within 2 ulp); RoPE rounds exactly as the torch path. Inputs must be
fp32 CPU tensors whose last dimension is contiguous; `native_library()` must have loaded
(`thinfer.kernels.cpu_native`).
"""

from __future__ import annotations

import ctypes

import torch

from thinfer.kernels.cpu_native import native_library


def _library() -> ctypes.CDLL:
    library = native_library()
    if library is None:
        raise RuntimeError("the native CPU kernels are unavailable here (see cpu_native)")
    return library


def add_rms_norm(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x) * weight, residual + x) for rows [T, H]; x None: norm(residual)."""
    rows, dim = residual.shape
    residual = residual.contiguous()
    if x is not None:
        x = x.contiguous()
    normed = torch.empty_like(residual)
    total = torch.empty_like(residual) if x is not None else residual
    _library().add_rms_norm(
        None if x is None else x.data_ptr(),
        residual.data_ptr(),
        weight.data_ptr(),
        rows,
        dim,
        eps,
        normed.data_ptr(),
        total.data_ptr(),
    )
    return normed, total


def rope_inplace(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place (views of one projection's rows are
    fine: heads must be contiguous within a row) by the cos/sin rows [P, D] of positions [T]."""
    for name, tensor in (("q", q), ("k", k)):
        if tensor.stride(2) != 1 or tensor.stride(1) != tensor.shape[2]:
            raise ValueError(f"rope: {name} needs contiguous heads, strides {tensor.stride()}")
    positions = positions.contiguous()
    _library().rope(
        q.data_ptr(),
        q.stride(0),
        q.shape[1],
        k.data_ptr(),
        k.stride(0),
        k.shape[1],
        q.shape[0],
        q.shape[2],
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] (gate first) -> [T, I]."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype)
    _library().silu_mul(gate_up.data_ptr(), rows, width, out.data_ptr())
    return out
