"""Weight-only int4 quantization for CPU decoding, on PyTorch's own packed int4 kernel.

Batch-1 decode on a CPU reads every weight once per token, so its speed is the bytes of the
weights over the memory bandwidth: int4 reads an eighth of fp32. Each row of a linear's
weight [N, K] is cut into groups of `GROUP` (32) along K; a group stores 4-bit codes q in
[0, 15] and one (scale, zero) pair, w = (q - 8) * scale + zero (PyTorch's
`_weight_int4pack_mm_for_cpu` convention), from the group's min and max: scale = (max - min)
/ 15, zero = min + 8 * scale, so q = 0 and q = 15 land on the group's min and max exactly.

The default model's GGUF is Q4_1, whose blocks are exactly this (32 values along K, a scale
d and a min m, w = d * q + m): quantizing its dequantized weights recovers d and m from each
block's min and max wherever the block uses codes 0 and 15, so int4 serves the file's own
weights. `Int4Weight` runs the native q4 kernel where it builds (`thinfer.kernels.cpu_qgemm`:
fp16 scale and min; int16 activations for one row, fp32 for more; output error ~1e-5 beyond
the weights' own) and otherwise PyTorch's kernel on bf16 activations and bf16 scales (its
fast path; ~0.5% relative error). lm_head gets int8 instead
(`thinfer.models.int8`): SmolLM2's is tied to the embeddings, which the GGUF stores at
higher precision (int4 put 16% error on its logits). The fp32 weights are kept. Measured on
the dev machine (2 cores, batch 1): a [960, 576] projection 0.047 ms in fp32 vs 0.022 ms
in int4, [576, 1536] 0.066 vs 0.032.
"""

from __future__ import annotations

import torch

from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_qgemm import Q4Weights, pack_q4, q4_matmul

GROUP = 32
FP16_SMALLEST_NORMAL, FP16_LARGEST = 2.0**-14, 6.0e4
_INNER_K_TILES = 2  # the packing's K tiling (2 x 16 values); K must be a multiple of 32
# The kernel's fast path takes bf16 activations and scales (fp32 ones: 40x slower, measured);
# x is rounded to bf16 on the way in and the result returned in fp32.
COMPUTE_DTYPE = torch.bfloat16


def int4_supported(weight: torch.Tensor) -> bool:
    """True when the CPU int4 kernel can run this weight [N, K]."""
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % GROUP == 0
        and weight.shape[0] % 16 == 0  # the torch packing's N tiles
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


def _group_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K / GROUP, GROUP] in [0, 15], scale and zero [N, K / GROUP]), fp32."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15)
    return codes, scale, low + 8 * scale


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales_and_zeros [K / GROUP, N, 2] bf16) of a weight [N, K]."""
    n, k = weight.shape
    codes, scale, zero = _group_codes(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.reshape(n, k).to(torch.int32), _INNER_K_TILES
    )
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1)
    return packed, scales_and_zeros.to(COMPUTE_DTYPE).contiguous()


def dequantize_int4_reference(weight: torch.Tensor) -> torch.Tensor:
    """The weight the int4 codes stand for, in fp32, with fp32 scales (torch reference)."""
    codes, scale, zero = _group_codes(weight)
    return ((codes - 8) * scale[..., None] + zero[..., None]).reshape(weight.shape)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x [M, K] W^T (+ bias) with W held as int4 codes: fp32 in and out, bf16 inside."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(COMPUTE_DTYPE).contiguous(), packed, GROUP, scales_and_zeros
    ).float()
    return out if bias is None else out + bias


class Int4Weight:
    """A linear's weight [N, K] in int4 groups, with the fastest kernel this machine has:
    the native q4 kernel (`thinfer.kernels.cpu_qgemm`: fp16 scale and min per group, int8
    activations; `backend` "native") where it loads, else PyTorch's packed int4 kernel (bf16
    scales and activations; "torch"). Both hold the same codes."""

    kind = "int4"

    def __init__(self, weight: torch.Tensor) -> None:
        codes, scale, zero = _group_codes(weight)
        low = zero - 8 * scale
        # fp16 holds the scales and mins to 11 bits only between its smallest normal number
        # and its largest: a weight outside that range keeps the torch kernel's bf16 ones.
        fits_fp16 = bool(scale.min() >= FP16_SMALLEST_NORMAL and low.abs().max() < FP16_LARGEST)
        native = native_library() is not None and fits_fp16
        self.backend = "native" if native else "torch"
        self._native: Q4Weights | None = None
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        if native:
            self._native = pack_q4(codes.reshape(weight.shape), scale, low)
        else:
            self._packed = quantize_int4(weight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] W^T (+ bias), fp32 in and out."""
        if self._native is not None:
            return q4_matmul(x, self._native, bias)
        assert self._packed is not None
        return int4_linear(x, *self._packed, bias)
