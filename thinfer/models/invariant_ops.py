"""The decoder's small ops for the deterministic (batch-invariant) mode.

Elementwise torch ops run in parallel chunks whose boundaries depend on the tensor's size,
and a chunk's tail runs the op's scalar code while the body runs its vector code. For
exact ops (add, multiply, divide, square root) both give the same bits; for a few
transcendental ones they do not: measured on the dev CPU, `torch.sigmoid` and `F.silu` of
one value differ in the last bit between the two paths for about 1% of inputs, so a row's
SiLU changed with the number of rows beside it. `torch.exp` gives the same bits on both
paths; `InvariantLayerOps.silu_mul` therefore computes silu(g) = g / (1 + exp(-g)) from exact
ops and `exp` alone, and `check_exp_is_pointwise` verifies the `exp` property at start-up
instead of assuming it. RMSNorm (per-row reduction, exact rescale) and RoPE (multiply-add with
cached tables) are already row-invariant and stay as they are.
"""

from __future__ import annotations

import torch

from thinfer.models.fused import LayerOps

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
