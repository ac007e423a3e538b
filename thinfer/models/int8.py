"""Weight-only int8 for CPU decoding, on PyTorch's packed int8 kernel.

Each output row of a weight [N, K] gets one scale, w = q * scale with q in [-127, 127]
(symmetric, per channel): a quantization step of 1/254 of the row's range, far finer than
int4's. The matmul runs on bf16 activations and bf16 scales (`_weight_int8pack_mm`; its fp32
path is ~5x slower, measured), the result is returned in fp32. Used for the layers int4 would
hurt (lm_head under `quantization="int4"`) and for every layer under `quantization="int8"`.
Measured on the dev machine (2 cores, batch 1): SmolLM2's lm_head [49152, 576] 8.4 ms in fp32
(oneDNN packed) vs 4.8 ms in int8.
"""

from __future__ import annotations

import torch

from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_qgemm import q8_matmul, q8_panels

COMPUTE_DTYPE = torch.bfloat16


def int8_supported(weight: torch.Tensor) -> bool:
    """True when the CPU int8 kernel can run this weight [N, K]."""
    return (  # K not a multiple of 16 gives garbage, not an error (measured)
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % 16 == 0
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    )


def _row_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] in [-127, 127], scales [N]), fp32."""
    scale = (weight.float().abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(weight.float() / scale[:, None]).clamp_(-127, 127), scale


def dequantize_int8_reference(weight: torch.Tensor) -> torch.Tensor:
    """The weight the int8 codes stand for, in fp32 with fp32 scales (torch reference)."""
    codes, scale = _row_codes(weight)
    return codes * scale[:, None]


def int8_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x [M, K] W^T (+ bias) with W held as int8 codes: fp32 in and out, bf16 inside."""
    out = torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE_DTYPE).contiguous(), codes, scales)
    return out.float() if bias is None else out.float() + bias


class Int8Weight:
    """A linear's weight [N, K] as int8 codes with one scale per row, with the fastest
    kernel this machine has: the native q8 kernel (`thinfer.kernels.cpu_qgemm`: fp32 scales,
    int16 activations for one row and fp32 for more, K a multiple of 32; `backend` "native")
    where it loads and takes the shape, else PyTorch's packed int8 kernel (bf16 scales and
    activations; "torch")."""

    kind = "int8"

    def __init__(self, weight: torch.Tensor) -> None:
        codes, scale = _row_codes(weight)
        native = native_library() is not None and weight.shape[1] % 32 == 0
        self.backend = "native" if native else "torch"
        self._codes = codes.to(torch.int8).contiguous()
        self._scales = scale if native else scale.to(COMPUTE_DTYPE)
        self._panels = q8_panels(self._codes) if native else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] W^T (+ bias), fp32 in and out."""
        if self.backend == "native":
            return q8_matmul(x, self._codes, self._scales, bias, self._panels)
        return int8_linear(x, self._codes, self._scales, bias)
