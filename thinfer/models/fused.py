"""The small per-layer ops of a decoder block: residual add + RMSNorm, RoPE, SiLU-multiply.

Two interchangeable implementations. `LayerOps` is the plain torch math the model has always
computed (the CPU path and the ground truth); `TritonLayerOps` runs the fused kernels of
`thinfer.kernels` (one pass for add + norm, q and k rotated in place, silu(gate) * up in one
pass). `select_layer_ops` picks one from the engine's `fused_ops` switch: "auto" uses the
Triton ops exactly when the attention backend is "triton" (so a CPU model computes bitwise what
it always did), True and False force them on or off.

Residual flow (as in vLLM): a decoder block returns (output, residual) without adding them;
the next norm adds and normalizes in one step and hands on the new residual stream. The torch
ops compute `residual + output` and then the norm, the same operations in the same order as
the unfused `x = x + block(norm(x))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from thinfer.models.rope import RotaryEmbedding, apply_rope

if TYPE_CHECKING:
    from thinfer.attention.backend import AttentionBackend
    from thinfer.models.norm import RMSNorm

# rotate(q [T, Hq, D], k [T, Hk, D]) -> rotated (q, k), for one step's positions.
Rotate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def in_place_rotation(
    apply: Callable[..., None], rotary: RotaryEmbedding, positions: torch.Tensor
) -> Rotate:
    """The `Rotate` of a kernel that rotates q and k in place, called as
    apply(q, k, positions, cos table, sin table)."""

    def rotate(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        apply(q, k, positions, rotary.cos, rotary.sin)
        return q, k

    return rotate


class LayerOps:
    """The torch implementation; also the interface `TritonLayerOps` overrides."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm(x) for x [T, hidden]."""
        return norm(x)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): a block's output x joins the residual stream."""
        residual = residual + x
        return norm(residual), residual

    def rotation(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> Rotate:
        """The RoPE rotation of one step's tokens at `positions` [T], shared by all layers
        (the torch path gathers the cos/sin rows once per step here)."""
        angles = rotary.angles(positions)

        def rotate(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return apply_rope(q, k, angles)

        return rotate

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for the fused projection gate_up [T, 2I] (gate first) -> [T, I]."""
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up


class TritonLayerOps(LayerOps):
    """The same ops through the Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1).

    Numerics: add + norm and RoPE round like the torch path up to summation order and one
    rounding per element (see the kernels' docstrings); silu-multiply computes in float32 and
    rounds once, so half dtypes can differ from the torch path by about one unit in the last
    place. Nothing here reads host state or syncs with the host, so the ops can be captured in
    a CUDA graph.
    """

    name = "triton"

    def __init__(self) -> None:
        # Imported here: triton is an optional dependency, needed only on this path.
        from thinfer.kernels import rmsnorm, rope, silu_mul

        self._rmsnorm = rmsnorm
        self._rope = rope
        self._silu_mul = silu_mul

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm(x) in one kernel pass."""
        return self._rmsnorm.rms_norm(x, norm.weight, norm.eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one kernel pass."""
        return self._rmsnorm.fused_add_rms_norm(x, residual, norm.weight, norm.eps)

    def rotation(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> Rotate:
        """Rotates q and k in place (views of the qkv projection are fine) and returns them."""
        return in_place_rotation(self._rope.apply_rope_inplace, rotary, positions)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up in one kernel pass (float32 math, one rounding)."""
        return self._silu_mul.silu_and_mul(gate_up)


class NativeLayerOps(LayerOps):
    """The same ops through the C kernels of `thinfer.kernels.cpu_layer_ops`, one call each,
    for fp32 CPU tensors (others take the torch path). At decode batch sizes on a CPU, the
    torch path's many small ops cost more in dispatch than in arithmetic.

    Numerics: RoPE rounds exactly as the torch path; add + norm differs by fp32 summation
    order, silu-multiply by the last bits of exp (2 ulp).
    """

    name = "native"

    def __init__(self) -> None:
        from thinfer.kernels import cpu_layer_ops

        self._ops = cpu_layer_ops

    @staticmethod
    def _native(x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm(x) in one call."""
        if not self._native(x):
            return super().rms_norm(x, norm)
        return self._ops.add_rms_norm(None, x, norm.weight, norm.eps)[0]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one call."""
        if not self._native(x):
            return super().add_rms_norm(x, residual, norm)
        return self._ops.add_rms_norm(x, residual, norm.weight, norm.eps)

    def rotation(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> Rotate:
        """Rotates q and k in place (views of the qkv projection are fine) and returns them."""
        if rotary.cos.dtype != torch.float32 or rotary.cos.device.type != "cpu":
            return super().rotation(rotary, positions)
        return in_place_rotation(self._ops.rope_inplace, rotary, positions)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up in one call."""
        if not self._native(gate_up):
            return super().silu_mul(gate_up)
        return self._ops.silu_mul(gate_up)


TORCH_OPS = LayerOps()


def select_layer_ops(
    fused_ops: str | bool, backend: AttentionBackend, device: torch.device
) -> LayerOps:
    """The layer ops for a model on `device` whose attention runs through `backend`.

    `fused_ops` "auto": the fused Triton kernels exactly when the backend is "triton", and on
    a CPU the native C ops (`NativeLayerOps`) where they load; True: the fused Triton
    kernels; False: plain torch. Raises ValueError for another value, and for fused
    kernels that cannot run here: triton does not import, or the device is not CUDA and the
    kernels are not interpreted (TRITON_INTERPRET=1, as CPU tests set).
    """
    if not (isinstance(fused_ops, bool) or fused_ops == "auto"):
        raise ValueError(f"fused_ops must be 'auto', True or False, got {fused_ops!r}")
    if fused_ops == "auto" and backend.name != "triton" and device.type == "cpu":
        from thinfer.kernels.cpu_native import native_library

        return NativeLayerOps() if native_library() is not None else TORCH_OPS
    if not (backend.name == "triton" if fused_ops == "auto" else fused_ops):
        return TORCH_OPS
    try:
        ops = TritonLayerOps()
    except ImportError as e:
        raise ValueError(f"fused ops need triton, which cannot be imported: {e}") from e
    if device.type != "cuda" and not fused_kernels_interpreted():
        raise ValueError(
            f"fused ops need a CUDA device, got {device.type!r} (on CPU the kernels run only "
            "through Triton's interpreter: TRITON_INTERPRET=1); use fused_ops=False"
        )
    return ops


def fused_kernels_interpreted() -> bool:
    """True when Triton interprets the fused kernels (TRITON_INTERPRET=1 was set before they
    were imported): they then run on CPU tensors too, slowly; otherwise they need CUDA."""
    from triton.runtime.interpreter import InterpretedFunction

    from thinfer.kernels import rmsnorm, rope, silu_mul

    kernels = (rmsnorm._fused_add_rms_norm_kernel, rope._rope_kernel, silu_mul._silu_and_mul_kernel)
    return all(isinstance(kernel, InterpretedFunction) for kernel in kernels)
