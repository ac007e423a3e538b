"""Where the deterministic mode runs its Triton kernels: on CUDA tensors, and on CPU tensors
too while `TRITON_ON_CPU` is set. Tests set it (with `TRITON_INTERPRET=1`, so Triton
interprets the kernels) to run the mode's CUDA code paths on a machine without a GPU; the
engine never sets it."""

from __future__ import annotations

import torch

TRITON_ON_CPU = False


def runs_triton(tensor: torch.Tensor) -> bool:
    """True when the deterministic mode computes on `tensor` through its Triton kernels."""
    return tensor.is_cuda or TRITON_ON_CPU
