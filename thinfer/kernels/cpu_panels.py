"""q4, q8 and fp32 weights packed in panels of 16 weight rows for the AVX-512 products of
`cpu/panel_products.c`, and their calls.

A panel stores, for each position k along K, the 16 rows' values side by side, so one vector
load widens one k of 16 weight rows, shared by every activation row of the batch (the C file
explains the layout and why it is ~1.8x the row-major tiles at 16 rows on a Zen 5 core).
N is padded to a multiple of 16 with zero rows. The panels are packed only where the
AVX-512 build loaded (`panels_available`): for q4 and q8 beside the row-major blocks, for an
fp32 layer instead of oneDNN's reordered copy (`thinfer.models.linear.Linear.pack`). The
results equal the (dequantized) weight's fp32 product up to summation order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from thinfer.kernels.cpu_native import native_isa, native_library

PANEL = 16
GROUP = 32


class Q4Panels(NamedTuple):
    """A q4 weight [N, K] in panels (see `cpu/panel_products.c`)."""

    codes: torch.Tensor  # uint8 [ceil(N / 16), K / 2, 16]: values 2i | 2i + 1 << 4 of each row
    factors: torch.Tensor  # float16 [ceil(N / 16), K / 32, 2, 16]: scales, then mins
    rows: int  # N


def panels_available() -> bool:
    """True when the loaded kernel build has the panel products (the AVX-512 one)."""
    return native_library() is not None and native_isa() == "avx512"


def _pad_rows(tensor: torch.Tensor) -> torch.Tensor:
    """tensor [N, ...] with zero rows appended up to a multiple of PANEL."""
    missing = -tensor.shape[0] % PANEL
    if not missing:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])])


def pack_q4_panels(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> Q4Panels:
    """Panels of q4 codes [N, K] in [0, 15] with scales and mins [N, K / 32] (w = d * q + m;
    the scales and mins rounded to fp16, as in `Q4Weights`)."""
    n, k = codes.shape
    values = _pad_rows(codes.to(torch.uint8)).reshape(-1, PANEL, k // 2, 2)
    lines = (values[..., 0] | (values[..., 1] << 4)).permute(0, 2, 1).contiguous()
    factors = torch.stack([_pad_rows(scales), _pad_rows(mins)], dim=1).to(torch.float16)
    factors = factors.reshape(-1, PANEL, 2, k // GROUP).permute(0, 3, 2, 1).contiguous()
    return Q4Panels(lines, factors, n)


def pack_q8_panels(codes: torch.Tensor) -> torch.Tensor:
    """Panels int8 [ceil(N / 16), K, 16] of int8 codes [N, K]."""
    n, k = codes.shape
    return _pad_rows(codes).reshape(-1, PANEL, k).permute(0, 2, 1).contiguous()


def pack_f32_panels(weight: torch.Tensor) -> torch.Tensor:
    """Panels fp32 [ceil(N / 16), K, 16] of an fp32 weight [N, K]."""
    n, k = weight.shape
    return _pad_rows(weight.detach().float()).reshape(-1, PANEL, k).permute(0, 2, 1).contiguous()


def _library() -> object:
    library = native_library()
    if library is None or not panels_available():
        raise RuntimeError("the panel products need the AVX-512 build of the native kernels")
    return library


def q4_panel_matmul(
    x: torch.Tensor, panels: Q4Panels, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """out [M, N] = x [M, K] W^T (+ bias); x contiguous fp32 and bias checked by the caller."""
    _library().q4_panel_linear(  # type: ignore[attr-defined]
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        panels.codes.data_ptr(),
        panels.factors.data_ptr(),
        panels.rows,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
    )
    return out


def q8_panel_matmul(
    x: torch.Tensor,
    panels: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """out [M, N] = x [M, K] W^T (+ bias) for W = scales[:, None] * codes in panels; x
    contiguous fp32, scales [N] and bias checked by the caller."""
    _library().q8_panel_linear(  # type: ignore[attr-defined]
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        panels.data_ptr(),
        scales.data_ptr(),
        scales.shape[0],
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
    )
    return out


def f32_panel_matmul(
    x: torch.Tensor, panels: torch.Tensor, rows: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] W^T (+ bias) -> [M, rows] for an fp32 weight W [rows, K] in panels; x any
    CPU float tensor [M, K], bias a contiguous fp32 [rows] or None (ValueError otherwise)."""
    x = x.to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != panels.shape[1] or x.device.type != "cpu":
        raise ValueError(f"expected CPU activations [M, {panels.shape[1]}], got {tuple(x.shape)}")
    if bias is not None and (
        bias.shape != (rows,) or bias.dtype != torch.float32 or not bias.is_contiguous()
    ):
        raise ValueError(f"expected a contiguous fp32 bias [{rows}], got {tuple(bias.shape)}")
    out = torch.empty(x.shape[0], rows)
    _library().f32_panel_linear(  # type: ignore[attr-defined]
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        panels.data_ptr(),
        rows,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
    )
    return out
