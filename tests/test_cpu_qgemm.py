"""The native CPU quantized matmuls (`thinfer.kernels.cpu_qgemm` on `cpu/qgemm.c`): they match
their torch references up to fp32 summation order, and fp32 matmuls up to the activations'
int16 quantization; the q4 block packing round-trips; bad input is refused with a ValueError;
THINFER_NATIVE_KERNELS=0 turns them off and Int4Weight falls back to torch's kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from thinfer.kernels.cpu_native import native_isa, native_library, native_unavailable_reason
from thinfer.kernels.cpu_panels import panels_available
from thinfer.kernels.cpu_qgemm import (
    GROUP,
    WHOLE_WEIGHT_MIN_ROWS,
    Q4Weights,
    pack_q4,
    q4_dequantize,
    q4_matmul,
    q4_matmul_reference,
    q8_dequantize,
    q8_matmul,
    q8_matmul_reference,
    q8_panels,
    quantize_activations,
    quantize_activations_reference,
    unpack_q4,
)
from thinfer.models.int4 import Int4Weight, _group_codes
from thinfer.models.int8 import Int8Weight, _row_codes

needs_native = pytest.mark.skipif(
    native_library() is None,
    reason=f"native CPU kernels unavailable: {native_unavailable_reason()}",
)

# (N, K): K = 320 has 10 groups, so the kernels' 8-wide loops over groups and their tails run.
# N not a multiple of the 4-row weight blocks; K over one 256-value block
SHAPES = [(64, 64), (202, 192), (71, 320)]
# The kernel and its reference differ only in fp32 summation order.
SUMMATION_RTOL = 1e-5
# "rows": the row-major blocks of qgemm.c; "panels": the AVX-512 build's panel products.
LAYOUTS = ["rows", "panels"]
# Against fp32 the int16 activations add at most 1/65534 of each group's largest value per
# term; PyTorch's kernels (the fallback) round activations to bf16 instead.
QUANTIZATION_RTOL = {"native": 1e-3, "torch": 2e-2}


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _q4_weights(n: int, k: int, generator: torch.Generator) -> Q4Weights:
    """Random q4 blocks whose weights w = d * q + m are centred on zero."""
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scales = torch.rand(n, k // GROUP, generator=generator) * 0.1 + 0.01
    mins = -8 * scales + 0.02 * torch.randn(n, k // GROUP, generator=generator)
    return pack_q4(codes, scales, mins)


def _q8_weights(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [N, K] and fp32 scales [N] of a random weight, as Int8Weight makes them."""
    codes, scales = _row_codes(torch.randn(n, k, generator=generator))
    return codes.to(torch.int8), scales


@needs_native
def test_quantize_activations_matches_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 192, generator=generator)
    x[1, 32:64] = 0.0  # an all-zero group: scale 0, codes 0
    x[2, 70] = 1e4  # an outlier: its group's other codes round to 0
    x[3] *= 1e-3
    codes, scales, sums = quantize_activations(x)
    ref_codes, ref_scales, ref_sums = quantize_activations_reference(x)
    assert codes.dtype == torch.int16 and codes.shape == x.shape
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    # fp32 sums in another order; the outlier's row has the outlier's rounding
    assert ((sums - ref_sums).abs() <= 1e-5 * x.abs().amax(1, keepdim=True).clamp_min(1)).all()
    assert scales[1, 1] == 0 and sums[1, 1] == 0 and not codes[1, 32:64].any()
    assert codes[2, 70] == 32767 and codes.abs().max() <= 32767


def _layout(layout: str) -> None:
    if layout == "panels" and not panels_available():
        pytest.skip(f"the panel products need the AVX-512 build (here: {native_isa()})")


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17, WHOLE_WEIGHT_MIN_ROWS])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_q4_matmul(n: int, k: int, m: int, with_bias: bool, layout: str) -> None:
    _layout(layout)
    generator = torch.Generator().manual_seed(n * k + m)
    weights = _q4_weights(n, k, generator)
    if layout == "rows":
        weights = weights._replace(panels=None)
    assert (weights.panels is not None) == (layout == "panels")
    x = torch.randn(m, k, generator=generator)
    bias = torch.randn(n, generator=generator) if with_bias else None
    out = q4_matmul(x, weights, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert _max_error(out, q4_matmul_reference(x, weights, bias)) < SUMMATION_RTOL
    fp32 = x @ unpack_q4(weights).T + (0 if bias is None else bias)
    assert _max_error(out, fp32) < QUANTIZATION_RTOL["native"]


@needs_native
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17, WHOLE_WEIGHT_MIN_ROWS])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_q8_matmul(n: int, k: int, m: int, with_bias: bool, layout: str) -> None:
    _layout(layout)
    generator = torch.Generator().manual_seed(n * k + m)
    codes, scales = _q8_weights(n, k, generator)
    panels = q8_panels(codes) if layout == "panels" else None
    x = torch.randn(m, k, generator=generator)
    bias = torch.randn(n, generator=generator) if with_bias else None
    out = q8_matmul(x, codes, scales, bias, panels)
    assert out.shape == (m, n) and out.dtype == torch.float32
    reference = q8_matmul_reference(x, codes, scales, bias, panels)
    assert _max_error(out, reference) < SUMMATION_RTOL
    fp32 = x @ (codes.float() * scales[:, None]).T + (0 if bias is None else bias)
    assert _max_error(out, fp32) < QUANTIZATION_RTOL["native"]


@needs_native
def test_dequantize_matches_the_torch_unpacking() -> None:
    """The whole-weight widening of prefill-sized products equals the reference unpacking
    (up to one fused multiply-add's rounding)."""
    generator = torch.Generator().manual_seed(3)
    weights = _q4_weights(70, 96, generator)
    torch.testing.assert_close(q4_dequantize(weights), unpack_q4(weights), rtol=1e-6, atol=1e-7)
    codes, scales = _q8_weights(70, 96, generator)
    torch.testing.assert_close(q8_dequantize(codes, scales), codes.float() * scales[:, None])


def test_pack_unpack_q4_round_trip() -> None:
    generator = torch.Generator().manual_seed(1)
    n, k = 40, 128
    codes = torch.randint(0, 16, (n, k), generator=generator)
    codes[0, :GROUP] = torch.arange(GROUP) % 16  # every code, in both nibbles
    scales = torch.rand(n, k // GROUP, generator=generator) * 0.3
    mins = torch.randn(n, k // GROUP, generator=generator)
    weights = pack_q4(codes, scales, mins)
    assert weights.shape == (n, k)
    assert weights.codes.dtype == torch.uint8 and weights.codes.shape == (n, k // 2)
    assert weights.scales_mins.dtype == torch.float16
    assert weights.scales_mins.shape == (n, 2, k // GROUP)
    d = scales.half().float().repeat_interleave(GROUP, dim=1)
    m = mins.half().float().repeat_interleave(GROUP, dim=1)
    assert torch.equal(unpack_q4(weights), codes.float() * d + m)


def test_bad_input_raises_value_error() -> None:
    generator = torch.Generator().manual_seed(2)
    n, k = 64, 96
    weights = _q4_weights(n, k, generator)
    codes, scales = _q8_weights(n, k, generator)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="activations"):
        q4_matmul(torch.randn(2, k + GROUP), weights, None)
    with pytest.raises(ValueError, match="activations"):
        q4_matmul(torch.randn(k), weights, None)
    with pytest.raises(ValueError, match="activations"):
        q8_matmul(torch.randn(2, k - GROUP), codes, scales, None)
    for bias in (torch.randn(n + 1), torch.randn(1, n), torch.randn(n, dtype=torch.float64)):
        with pytest.raises(ValueError, match="bias"):
            q4_matmul(x, weights, bias)
        with pytest.raises(ValueError, match="bias"):
            q8_matmul(x, codes, scales, bias)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_q4(torch.zeros(n, 48, dtype=torch.long), torch.ones(n, 1), torch.zeros(n, 1))
    ones, zeros = torch.ones(n, k // GROUP), torch.zeros(n, k // GROUP)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_q4(torch.full((n, k), 16), ones, zeros)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_q4(torch.full((n, k), -1), ones, zeros)
    with pytest.raises(ValueError, match="int8"):
        q8_matmul(x, codes.to(torch.int16), scales, None)
    with pytest.raises(ValueError, match="int8"):
        q8_matmul(x, codes.float(), scales, None)
    with pytest.raises(ValueError, match="fp32 scales"):
        q8_matmul(x, codes, scales.half(), None)


_DISABLED_SCRIPT = textwrap.dedent(
    """
    import json

    import torch
    import torch.nn.functional as F

    from thinfer.kernels.cpu_native import native_library, native_unavailable_reason
    from thinfer.models.int4 import Int4Weight, dequantize_int4_reference

    generator = torch.Generator().manual_seed(3)
    w = torch.randn(96, 128, generator=generator)
    x = torch.randn(3, 128, generator=generator)
    bias = torch.randn(96, generator=generator)
    weight = Int4Weight(w)
    expected = F.linear(x, dequantize_int4_reference(w), bias)
    error = (weight.matmul(x, bias) - expected).abs().max() / expected.abs().max()
    print(json.dumps({
        "library": native_library() is not None,
        "reason": native_unavailable_reason(),
        "backend": weight.backend,
        "error": error.item(),
    }))
    """
)


@pytest.mark.parametrize("cause", ["disabled", "compiler fails"])
def test_without_native_kernels_the_torch_kernels_serve(cause: str, tmp_path: Path) -> None:
    """THINFER_NATIVE_KERNELS=0, or a compiler that fails (a fresh cache, so it must build):
    no library, a reason that says why, and Int4Weight on PyTorch's kernel."""
    if cause == "disabled":
        env, reason = {**os.environ, "THINFER_NATIVE_KERNELS": "0"}, "THINFER_NATIVE_KERNELS"
    elif native_library() is None:
        pytest.skip("no native CPU kernels here to fail building")
    else:
        env = {**os.environ, "CC": "false", "THINFER_CACHE": str(tmp_path)}
        reason = "false failed on the CPU kernels"
    result = subprocess.run(
        [sys.executable, "-c", _DISABLED_SCRIPT], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["library"] is False
    assert reason in report["reason"]
    assert report["backend"] == "torch"
    assert report["error"] < 1e-2


@needs_native
def test_int4_weight_uses_native_kernel() -> None:
    assert native_unavailable_reason() is None
    assert Int4Weight(torch.randn(64, 64)).backend == "native"
    assert Int8Weight(torch.randn(64, 64)).backend == "native"


@pytest.mark.parametrize("m", [1, 3, 17])
def test_int4_weight_matches_dequantized(m: int) -> None:
    generator = torch.Generator().manual_seed(4 + m)
    n, k = 112, 160  # N a multiple of 16: torch's int4 packing (the fallback) needs it
    w = torch.randn(n, k, generator=generator)
    x = torch.randn(m, k, generator=generator)
    bias = torch.randn(n, generator=generator)
    codes, scale, zero = _group_codes(w)
    dequantized = ((codes - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    weight = Int4Weight(w)
    for b in (None, bias):
        expected = F.linear(x, dequantized, b)
        assert _max_error(weight.matmul(x, b), expected) < QUANTIZATION_RTOL[weight.backend], (
            weight.backend
        )


@pytest.mark.parametrize("m", [1, 3, 17])
def test_int8_weight_matches_dequantized(m: int) -> None:
    generator = torch.Generator().manual_seed(5 + m)
    n, k = 136, 192
    w = torch.randn(n, k, generator=generator)
    x = torch.randn(m, k, generator=generator)
    bias = torch.randn(n, generator=generator)
    codes, scale = _row_codes(w)
    weight = Int8Weight(w)
    for b in (None, bias):
        expected = F.linear(x, codes * scale[:, None], b)
        assert _max_error(weight.matmul(x, b), expected) < QUANTIZATION_RTOL[weight.backend], (
            weight.backend
        )


@needs_native
@pytest.mark.parametrize("m", [1, 5, 17])
def test_f32_matmul_and_the_packed_linear_route(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native fp32 GEMV equals F.linear up to summation order; a packed Linear takes the
    panels for every row count where the AVX-512 build runs, else the GEMV up to
    NATIVE_FP32_MAX_ROWS rows and oneDNN above, with the same result either way."""
    from thinfer.kernels.cpu_qgemm import f32_matmul
    from thinfer.models import linear
    from thinfer.models.linear import NATIVE_FP32_MAX_ROWS, Linear

    generator = torch.Generator().manual_seed(m)
    layer = Linear(264, 30, bias=True)  # K over one 256-value block, N not a multiple of 4
    layer.weight.data = torch.randn(30, 264, generator=generator)
    layer.bias.data = torch.randn(30, generator=generator)
    x = torch.randn(m, 264, generator=generator)
    expected = F.linear(x, layer.weight, layer.bias)
    assert _max_error(f32_matmul(x, layer.weight, layer.bias), expected) < SUMMATION_RTOL
    assert layer.pack()
    assert (layer._panels is not None) == panels_available()
    assert layer._native_fp32 == (not panels_available())
    assert (layer._packed is None) == panels_available()  # panels replace oneDNN's copy
    calls: list[str] = []
    panel_matmul, gemv = linear.f32_panel_matmul, linear.f32_matmul
    monkeypatch.setattr(linear, "f32_matmul", lambda *a: calls.append("gemv") or gemv(*a))
    monkeypatch.setattr(
        linear, "f32_panel_matmul", lambda *a: calls.append("panels") or panel_matmul(*a)
    )
    assert _max_error(layer(x), expected) < SUMMATION_RTOL
    if panels_available():
        assert calls == ["panels"]
    else:
        assert calls == (["gemv"] if m <= NATIVE_FP32_MAX_ROWS else [])
    with pytest.raises(ValueError, match="K % 8"):
        f32_matmul(torch.randn(1, 12), torch.randn(3, 12), None)
    with pytest.raises(ValueError, match="activations"):
        f32_matmul(torch.randn(1, 16), torch.randn(3, 40), None)


@needs_native
@pytest.mark.parametrize("m", [1, 12, 13, 40])
def test_f32_panels_match_f_linear(m: int) -> None:
    """Two panels per tile, 12 rows per tile: an odd panel count (the last one alone, and
    partial: N = 70), row counts at and past a tile, with and without bias."""
    from thinfer.kernels.cpu_panels import f32_panel_matmul, pack_f32_panels

    _layout("panels")
    generator = torch.Generator().manual_seed(40 + m)
    weight = torch.randn(70, 200, generator=generator)
    bias = torch.randn(70, generator=generator)
    x = torch.randn(m, 200, generator=generator)
    panels = pack_f32_panels(weight)
    assert panels.shape == (5, 200, 16) and not panels[4, :, 6:].any()
    for b in (None, bias):
        out = f32_panel_matmul(x, panels, 70, b)
        assert out.shape == (m, 70)
        assert _max_error(out, F.linear(x, weight, b)) < SUMMATION_RTOL
    with pytest.raises(ValueError, match="activations"):
        f32_panel_matmul(torch.randn(m, 100), panels, 70, None)
    with pytest.raises(ValueError, match="bias"):
        f32_panel_matmul(x, panels, 70, torch.randn(71))
    assert f32_panel_matmul(torch.empty(0, 200), panels, 70, None).shape == (0, 70)


@needs_native
def test_zero_rows_give_an_empty_result() -> None:
    """A step that samples nothing sends 0 rows to lm_head: each product returns [0, N]
    without touching memory (this once wrote past the output and crashed the engine)."""
    from thinfer.kernels.cpu_qgemm import f32_matmul

    generator = torch.Generator().manual_seed(5)
    x = torch.empty(0, 64)
    weight = torch.randn(4096, 64, generator=generator)
    assert f32_matmul(x, weight, None).shape == (0, 4096)
    assert q4_matmul(x, _q4_weights(4096, 64, generator), None).shape == (0, 4096)
    codes, scales = _q8_weights(4096, 64, generator)
    assert q8_matmul(x, codes, scales, None).shape == (0, 4096)
    if panels_available():
        assert q8_matmul(x, codes, scales, None, q8_panels(codes)).shape == (0, 4096)
