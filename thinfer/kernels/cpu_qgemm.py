"""CPU quantized matmuls on the C kernels of `cpu/qgemm.c`, beside their torch references.

y [M, N] = x [M, K] W^T (+ bias) with W held as

- q4 (`Q4Weights`): per group of 32 values of a row, 4-bit codes q in [0, 15] and an fp16
  (scale d, min m) pair, w = d * q + m: GGUF Q4_1's blocks, 5 bits per weight;
- q8 (`q8_matmul`): int8 codes c in [-127, 127] and one fp32 scale s per row, w = s * c.

A single row (M = 1, a batch-1 decode step) quantizes the activations per group of 32 values
along K to int16 (one fp32 scale, max|x| / 32767, and the fp32 sum per group: llama.cpp's
Q8_1 with 16-bit codes, since 8 bits lose too much to the outlier channels of LLM
activations) and runs exact integer group dots. From DEQUANTIZED_MIN_ROWS rows on, each
block of weight rows is widened to fp32 once and multiplied with the fp32 activations (the
widening pays for itself over the rows). From WHOLE_WEIGHT_MIN_ROWS rows on (a prefill) the
whole weight is widened into a temporary fp32 copy and torch's blocked GEMM runs: its cache
blocking beats the decode tiles there (measured on a 2-core EPYC: 1.5x at 480 rows, break-even
near 150). Either way the result differs from the torch reference only
by fp32 summation order; against fp32 weights the error is the weights' quantization plus,
for one row, the activations' (at most half of 1/32767 of each group's largest value).

Where the AVX-512 build of the kernels loaded, the weights also come in panels of 16 rows
(`thinfer.kernels.cpu_panels`) and every product runs on them instead, with fp32
activations whatever the row count: measured on a 2-core Zen 5 EPYC, 1.8x the row-major
tiles at 16 rows, 2x the whole-weight route at 512, and on a par with the int16 path at one
row. `native_library()` (`thinfer.kernels.cpu_native`) says whether the kernels run here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_panels import (
    Q4Panels,
    pack_q4_panels,
    pack_q8_panels,
    panels_available,
    q4_panel_matmul,
    q8_panel_matmul,
)

GROUP = 32
DEQUANTIZED_MIN_ROWS = 2  # as in qgemm.c
WHOLE_WEIGHT_MIN_ROWS = 160


class Q4Weights(NamedTuple):
    """A weight [N, K] as q4 blocks."""

    codes: torch.Tensor  # uint8 [N, K / 2]: value j of a group low nibble, j + 16 high
    scales_mins: torch.Tensor  # float16 [N, 2, K / 32]: the row's scales d, then its mins m
    # The same weights in panels for several activation rows (`cpu_panels`), where the
    # AVX-512 build runs them.
    panels: Q4Panels | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight these blocks stand for."""
        return self.codes.shape[0], self.codes.shape[1] * 2


def pack_q4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> Q4Weights:
    """Blocks of codes [N, K] in [0, 15] with scales and mins [N, K / 32]: w = d * q + m."""
    n, k = codes.shape
    if k % GROUP or codes.min() < 0 or codes.max() > 15:
        raise ValueError(f"q4 codes need K a multiple of {GROUP} and values in [0, 15]")
    groups = codes.to(torch.uint8).reshape(n, k // GROUP, GROUP)
    packed = groups[..., : GROUP // 2] | (groups[..., GROUP // 2 :] << 4)
    scales_mins = torch.stack([scales, mins], dim=1).to(torch.float16)
    panels = None
    if panels_available():
        panels = pack_q4_panels(codes, scales_mins[:, 0], scales_mins[:, 1])
    return Q4Weights(packed.reshape(n, k // 2).contiguous(), scales_mins.contiguous(), panels)


def q8_panels(codes: torch.Tensor) -> torch.Tensor | None:
    """int8 codes [N, K] in panels for `q8_matmul`, None where the panel products do not run."""
    return pack_q8_panels(codes) if panels_available() else None


def unpack_q4(weights: Q4Weights) -> torch.Tensor:
    """The fp32 weight [N, K] the blocks stand for (their fp16 scales and mins in fp32)."""
    n, k = weights.shape
    packed = weights.codes.reshape(n, k // GROUP, GROUP // 2)
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
    scales, mins = weights.scales_mins.float().unbind(1)
    return (codes * scales[..., None] + mins[..., None]).reshape(n, k)


def _call(name: str, *args: object) -> None:
    library = native_library()
    if library is None:
        raise RuntimeError("the native CPU kernels are unavailable here (see cpu_native)")
    getattr(library, name)(*args)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check(x: torch.Tensor, k: int, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x as contiguous fp32 [M, k]; ValueError for a bad x or bias (the kernels read raw
    memory, so a wrong shape, dtype or stride would be silently wrong)."""
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu" or k % GROUP:
        raise ValueError(
            f"expected CPU activations [M, {k}] (K a multiple of {GROUP}), got "
            f"{tuple(x.shape)} on {x.device}"
        )
    if bias is not None and (
        bias.shape != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()
    ):
        raise ValueError(
            f"expected a contiguous fp32 bias [{n}], got {tuple(bias.shape)} {bias.dtype}"
        )
    return x.to(torch.float32).contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int16 codes [M, K], scales [M, K / 32], sums [M, K / 32]) of x [M, K] (in fp32)."""
    x = _check(x, x.shape[-1], None, 0)
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int16)
    scales = torch.empty(m, k // GROUP)
    sums = torch.empty(m, k // GROUP)
    _call("q16_quantize", x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), sums.data_ptr())
    return codes, scales, sums


def q4_matmul(x: torch.Tensor, weights: Q4Weights, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T (+ bias) with W as q4 blocks, on the C kernel."""
    n, k = weights.shape
    x = _check(x, k, bias, n)
    if weights.panels is not None:
        return q4_panel_matmul(x, weights.panels, bias, torch.empty(x.shape[0], n))
    if x.shape[0] >= WHOLE_WEIGHT_MIN_ROWS:
        return torch.nn.functional.linear(x, q4_dequantize(weights), bias)
    out = torch.empty(x.shape[0], n)
    _call(
        "q4_linear",
        x.data_ptr(),
        x.shape[0],
        k,
        weights.codes.data_ptr(),
        weights.scales_mins.data_ptr(),
        n,
        _pointer(bias),
        out.data_ptr(),
    )
    return out


def q4_dequantize(weights: Q4Weights) -> torch.Tensor:
    """The fp32 weight [N, K] q4 blocks stand for, on the C kernel (`unpack_q4` is its
    reference)."""
    n, k = weights.shape
    out = torch.empty(n, k)
    codes, scales_mins = weights.codes.contiguous(), weights.scales_mins.contiguous()
    _call("q4_dequantize", codes.data_ptr(), scales_mins.data_ptr(), n, k, out.data_ptr())
    return out


def q8_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [N, K] = scales[:, None] * codes (int8 [N, K], fp32 [N], contiguous),
    on the C kernel."""
    n, k = codes.shape
    out = torch.empty(n, k)
    _call("q8_dequantize", codes.data_ptr(), scales.data_ptr(), n, k, out.data_ptr())
    return out


def q8_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    panels: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T (+ bias) with W = scales[:, None] * codes (int8 [N, K], fp32
    scales [N]), on the C kernel; `panels` (`q8_panels(codes)`) serve several rows."""
    n, k = codes.shape
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.shape != (n,):
        raise ValueError(
            f"q8 weights need int8 codes [N, K] and fp32 scales [N], got "
            f"{codes.dtype} {tuple(codes.shape)} and {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    x = _check(x, k, bias, n)
    codes, scales = codes.contiguous(), scales.contiguous()  # kept alive through the call
    if panels is not None:
        return q8_panel_matmul(x, panels, scales, bias, torch.empty(x.shape[0], n))
    if x.shape[0] >= WHOLE_WEIGHT_MIN_ROWS:
        return torch.nn.functional.linear(x, q8_dequantize(codes, scales), bias)
    out = torch.empty(x.shape[0], n)
    _call(
        "q8_linear",
        x.data_ptr(),
        x.shape[0],
        k,
        codes.data_ptr(),
        scales.data_ptr(),
        n,
        _pointer(bias),
        out.data_ptr(),
    )
    return out


def quantize_activations_reference(
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of `quantize_activations` (the same fp32 operations)."""
    m, k = x.shape
    groups = x.float().reshape(m, k // GROUP, GROUP)
    scales = groups.abs().amax(-1) / 32767.0
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = torch.round(groups * inverse[..., None]).clamp(-32767, 32767).to(torch.int16)
    return codes.reshape(m, k), scales, groups.sum(-1)


def q4_matmul_reference(
    x: torch.Tensor, weights: Q4Weights, bias: torch.Tensor | None
) -> torch.Tensor:
    """Torch reference of `q4_matmul`: integer group dots, scaled and summed in fp32 (one
    row on the row-major blocks), or the fp32 matmul with the dequantized weight (more rows,
    or panels)."""
    if x.shape[0] >= DEQUANTIZED_MIN_ROWS or weights.panels is not None:
        return torch.nn.functional.linear(x.float(), unpack_q4(weights), bias)
    n, k = weights.shape
    codes, scales, sums = quantize_activations_reference(x)
    packed = weights.codes.reshape(n, k // GROUP, GROUP // 2)
    w_codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.int32)
    x_codes = codes.reshape(-1, k // GROUP, GROUP).to(torch.int32)
    dots = torch.einsum("mgi,ngi->mng", x_codes, w_codes).float()  # exact integers
    w_scales, w_mins = weights.scales_mins.float().unbind(1)
    out = (dots * w_scales[None] * scales[:, None]).sum(-1) + sums @ w_mins.t()
    return out if bias is None else out + bias


def q8_matmul_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    panels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `q8_matmul` (integer group dots for one row without panels, fp32
    otherwise)."""
    if x.shape[0] >= DEQUANTIZED_MIN_ROWS or panels is not None:
        out = (x.float() @ codes.float().t()) * scales
        return out if bias is None else out + bias
    n, k = codes.shape
    x_codes, x_scales, _ = quantize_activations_reference(x)
    dots = torch.einsum(
        "mgi,ngi->mng",
        x_codes.reshape(-1, k // GROUP, GROUP).to(torch.int32),
        codes.reshape(n, k // GROUP, GROUP).to(torch.int32),
    ).float()
    out = (dots * x_scales[:, None]).sum(-1) * scales
    return out if bias is None else out + bias


def f32_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T (+ bias) for an fp32 weight [N, K] (K a multiple of 8), on the
    fp32 tiles of the C kernel: a GEMV that streams the weights once, for decode batches."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or not weight.is_contiguous() or k % 8:
        raise ValueError("f32_matmul needs a contiguous fp32 weight [N, K], K % 8 == 0")
    x = x.to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"expected activations [M, {k}], got {tuple(x.shape)}")
    if bias is not None and (
        bias.shape != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()
    ):
        raise ValueError(f"expected a contiguous fp32 bias [{n}], got {tuple(bias.shape)}")
    out = torch.empty(x.shape[0], n)
    _call(
        "f32_linear",
        x.data_ptr(),
        x.shape[0],
        k,
        weight.data_ptr(),
        n,
        _pointer(bias),
        out.data_ptr(),
    )
    return out
