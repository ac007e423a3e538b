"""The decoder's small ops for the deterministic (batch-invariant) mode.

Elementwise torch ops run in parallel chunks whose boundaries depend on the tensor's size,
and a chunk's tail runs the op's scalar code while the body runs its vector code. For
exact ops (add, multiply, divide, square root) both give the same bits; for a few
transcendental ones they do not: measured on the dev CPU, `torch.sigmoid` and `F.silu` of
one value differ in the last bit between the two paths for about 1% of inputs, so a row's
SiLU changed with the number of rows beside it. `torch.exp` gives the same bits on both
paths; `InvariantLayerOps.silu_mul` therefore computes silu(g) = g / (1 + exp(-g)) from exact
ops and `exp` alone, and `check_exp_is_pointwise` verifies the `exp` property at start-up
instead of assuming it. RoPE (multiply-add with cached tables) is row-invariant as it is.

RMSNorm is a per-row reduction, and a general torch reduction (`x.pow(2).mean(-1)`, the
module's path for half dtypes) is not row-invariant: on CUDA it sizes its thread blocks from
the number of rows (one row of a 1-row call is summed by 512 threads, by 32 beside 15 others).
The mode's norm is one fixed-size program per row: the Triton kernel on CUDA, `F.rms_norm`'s
fused per-row kernel on the CPU (half dtypes through a float32 copy); `check_norm_rows`
checks the property at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thinfer.kernels.placement import runs_triton
from thinfer.models.fused import LayerOps
from thinfer.models.norm import RMSNorm

# Lengths and offsets chosen to put values in vector bodies, scalar tails and chunk edges.
_PROBE_SLICES = ((0, 1), (3, 1), (5, 7), (1, 17), (0, 33), (13, 1001), (7, 70001))


class InvariantLayerOps(LayerOps):
    """The torch ops with a SiLU whose every element is computed the same way whatever the
    tensor's size (see the module docstring)."""

    name = "invariant"

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up [T, 2I] -> [T, I], as gate / (1 + exp(-gate)) * up
        (in float32 for half dtypes, rounded once)."""
        gate, up = gate_up.float().split(gate_up.shape[-1] // 2, dim=-1)
        return (gate / (1.0 + torch.exp(-gate)) * up).to(gate_up.dtype)

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm(x) for x [T, hidden], one fixed-size program per row."""
        if runs_triton(x):
            from thinfer.kernels import rmsnorm

            return rmsnorm.rms_norm(x, norm.weight, norm.eps)
        if x.dtype == torch.float32:
            return norm(x)  # F.rms_norm: the fused per-row kernel
        normed = F.rms_norm(x.float(), norm.weight.shape, None, norm.eps)
        return norm.weight * normed.to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x), the norm as `rms_norm`."""
        if runs_triton(x):
            from thinfer.kernels import rmsnorm

            return rmsnorm.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        residual = residual + x
        return self.rms_norm(residual, norm), residual


def check_exp_is_pointwise(device: torch.device, dtype: torch.dtype) -> None:
    """RuntimeError unless `torch.exp` gives each element the same bits whatever the size and
    offset of the tensor it sits in (vector body, scalar tail, parallel chunk edge) on this
    device and dtype; the deterministic mode's guarantee rests on it."""
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(80_000, generator=generator) * 8).to(device=device, dtype=dtype)
    whole = torch.exp(values)
    for offset, length in _PROBE_SLICES:
        part = torch.exp(values[offset : offset + length].clone())
        if not torch.equal(part, whole[offset : offset + length]):
            raise RuntimeError(
                f"deterministic mode: torch.exp on {device.type} {dtype} gives other bits for "
                "an element depending on the tensor around it, so the SiLU cannot be made "
                "batch-invariant with it on this build"
            )


INVARIANT_OPS = InvariantLayerOps()


def check_norm_rows(
    hidden: int, dtype: torch.dtype, device: torch.device, ops: LayerOps = INVARIANT_OPS
) -> None:
    """RuntimeError unless `ops`' RMSNorm (alone and after the residual add) gives each row
    the same bits in calls of 1 to 67 rows on this device and dtype."""
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, 1e-5).to(device=device, dtype=dtype)
    norm.weight.copy_(torch.rand(hidden, generator=generator) + 0.5)
    x, residual = (torch.randn(67, hidden, generator=generator).to(device, dtype) for _ in "xr")
    full = ops.rms_norm(x, norm)
    fused = ops.add_rms_norm(x, residual, norm)[0]
    for rows in (1, 2, 5, 16, 33):
        if not (
            torch.equal(ops.rms_norm(x[:rows].clone(), norm), full[:rows])
            and torch.equal(
                ops.add_rms_norm(x[:rows].clone(), residual[:rows].clone(), norm)[0],
                fused[:rows],
            )
        ):
            raise RuntimeError(
                f"deterministic mode: RMSNorm ({ops.name} ops) on {device.type} {dtype} gives "
                f"a row other bits in a call of {rows} rows than of 67, so the decoder cannot "
                "be made batch-invariant on this build"
            )


def check_silu_rows(width: int, dtype: torch.dtype, device: torch.device, ops: LayerOps) -> None:
    """RuntimeError unless `ops`' silu-multiply gives each row the same bits in calls of 1 to
    67 rows (for ops that do not go through `exp` alone, as the native C ops)."""
    generator = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(67, 2 * width, generator=generator) * 6).to(device, dtype)
    full = ops.silu_mul(gate_up)
    for first, rows in ((0, 1), (5, 1), (1, 2), (3, 16), (0, 33)):
        if not torch.equal(
            ops.silu_mul(gate_up[first : first + rows].clone()), full[first : first + rows]
        ):
            raise RuntimeError(
                f"deterministic mode: SiLU ({ops.name} ops) on {device.type} {dtype} gives a "
                f"row other bits in a call of {rows} rows than of 67, so the decoder cannot "
                "be made batch-invariant on this build"
            )
