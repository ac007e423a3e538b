"""Batch-invariant linear layers: the Triton kernel (`thinfer.kernels.invariant_matmul`)
against its float64 reference and bitwise row invariance over M, its input checks, and the
CPU path (`tiled_linear`, `row_invariance_self_test` in `thinfer.models.invariant_linear`)
with a negative control. On CPU the kernel runs through Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before the kernel module is imported); Llama-2-7B shapes need CUDA."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from thinfer.kernels.cpu_panels import pack_f32_panels, panels_available
from thinfer.models.invariant_linear import (
    ANY_ROWS,
    TILE_LADDER,
    TILE_ROWS,
    choose_tiles,
    plain_matmul,
    row_invariance_self_test,
    rows_independent_self_test,
    tiled_linear,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU test at real shapes needs CUDA")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # of max |y|
N, K = 48, 80  # neither a multiple of the kernel's tiles
ROWS = (1, 3, 16, 17, 40, 80)  # the last spans two 64-row tiles, each call against it


@pytest.fixture(scope="module")
def im():
    """The kernel module (skips without Triton)."""
    return pytest.importorskip("thinfer.kernels.invariant_matmul")


def _operands(m, n, k, dtype, seed=0, bias=True, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = torch.randn(n, k, generator=gen).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, w, b


def _assert_close(y, expected, dtype):
    assert y.shape == expected.shape and y.dtype == dtype
    error = (y.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(expected.float().abs().max().item(), 1.0), error


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_float64_reference(im, dtype, bias):
    x, w, b = _operands(17, N, K, dtype, seed=3, bias=bias)
    expected = im.invariant_linear_reference(x, w, b)
    assert expected.dtype == dtype
    _assert_close(im.invariant_linear(x, w, b), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rows_are_bitwise_invariant_over_m(im, dtype):
    x, w, b = _operands(ROWS[-1], N, K, dtype, seed=5)
    full = im.invariant_linear(x, w, b)
    for m in ROWS[:-1]:
        assert torch.equal(im.invariant_linear(x[:m], w, b), full[:m]), m


def test_kernel_tiles_do_not_depend_on_m(im):
    assert list(inspect.signature(im.invariant_config).parameters) == ["n", "k", "dtype"]
    assert im.invariant_config(4096, 4096, torch.bfloat16).block_k == im.BLOCK_K


def test_kernel_rejects_bad_operands(im, monkeypatch):
    x, w, b = _operands(5, N, K, torch.float32)
    cases = [
        ((x[0], w, None), r"expected x \[M, K\] and weight \[N, K\]"),
        ((x, w[:, :8], None), r"expected x \[M, K\] and weight \[N, K\]"),
        ((x.double(), w.double(), None), "x must be float32, bfloat16 or float16"),
        ((x, w.half(), None), "x is torch.float32 but weight is torch.float16"),
        ((x, w, b[:8]), r"expected bias \[48\], got \(8,\)"),
        ((x, w, b.half()), "x is torch.float32 but bias is torch.float16"),
    ]
    for operands, message in cases:
        with pytest.raises(ValueError, match=message):
            im.invariant_linear(*operands)
    assert im.invariant_linear(x[:0], w).shape == (0, N)
    monkeypatch.setattr(im, "kernels_interpreted", lambda: False)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            im.invariant_linear(x, w)
    else:
        with pytest.raises(ValueError, match="must be on one device"):
            im.invariant_linear(x, w.cpu())


def _cpu_matmuls(weight):
    """`plain_matmul` with MKL's F.linear and, where oneDNN is there, its packed weights."""
    out = {"f_linear": plain_matmul(weight)}
    if torch.backends.mkldnn.is_available():
        out["onednn"] = plain_matmul(weight, torch.ops.mkldnn._reorder_linear_weight(weight))
    return out


def test_tiled_linear_matches_and_is_row_invariant():
    x, w, b = _operands(33, 64, 96, torch.float32, seed=7, device="cpu")
    for name, matmul in _cpu_matmuls(w).items():
        full = tiled_linear(x, matmul, 64, bias=b)
        torch.testing.assert_close(full, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        for m in (1, 2, 3, 5, 16, 17):
            assert torch.equal(tiled_linear(x[:m], matmul, 64, bias=b), full[:m]), (name, m)


def test_self_test_passes_for_plain_matmul_and_catches_position_dependence():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    assert row_invariance_self_test(plain_matmul(w), 96, TILE_ROWS, torch.float32)

    def by_position(t):  # deliberately not invariant: each row shifted by its index
        return F.linear(t, w) + torch.arange(t.shape[0])[:, None] * 1e-3

    assert not row_invariance_self_test(by_position, 96, TILE_ROWS, torch.float32)
    assert choose_tiles(by_position, 96, torch.float32) == (1,)


def test_tile_ladder_keeps_rows_invariant():
    """The ladder `choose_tiles` verifies (wide tiles for long inputs, the small one padded
    for the rest) gives a row the same bits for every M, including across the wide size."""
    x, w, _ = _operands(300, 64, 96, torch.float32, seed=3, device="cpu")
    for matmul in _cpu_matmuls(w).values():
        tiles = choose_tiles(matmul, 96, torch.float32)
        assert tiles == (1,) or (TILE_ROWS in tiles and set(tiles) <= set(TILE_LADDER))
        full = tiled_linear(x, matmul, 64, tile_rows=tiles)
        for m in (1, 2, 3, 5, 9, 17, 31, 33, 64, 127, 128, 129, 256, 299):
            assert torch.equal(tiled_linear(x[:m], matmul, 64, tile_rows=tiles), full[:m])


def test_rows_independent_check_catches_a_kernel_that_changes_with_m():
    """A kernel whose rows shift with the row count passes the fixed-tile self-test (it
    only ever sees one count there) but not the any-count one, so it keeps a tile ladder."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))

    def by_count(t):
        return F.linear(t, w) * (1 + 1e-3 * (t.shape[0] in (5, 24)))

    assert row_invariance_self_test(by_count, 96, TILE_ROWS, torch.float32)
    assert not rows_independent_self_test(by_count, 96, torch.float32)
    assert choose_tiles(by_count, 96, torch.float32, rows_independent=True) != (ANY_ROWS,)


@pytest.mark.skipif(not panels_available(), reason="the native fp32 panels (AVX-512 build)")
def test_panels_take_any_row_count_in_one_call():
    """The native fp32 panels compute each row on its own: verified, they take every row in
    one call, and a row's bits are the same for every M (12-row tiles and their remainders)."""
    x, w, b = _operands(300, 70, 96, torch.float32, seed=5, device="cpu")
    matmul = plain_matmul(w, panels=pack_f32_panels(w))
    assert choose_tiles(matmul, 96, torch.float32, rows_independent=True) == (ANY_ROWS,)
    full = tiled_linear(x, matmul, 70, bias=b, tile_rows=(ANY_ROWS,))
    torch.testing.assert_close(full, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for m in (1, 2, 11, 12, 13, 23, 25, 97, 299):
        part = tiled_linear(x[300 - m :].clone(), matmul, 70, bias=b, tile_rows=(ANY_ROWS,))
        assert torch.equal(part, full[300 - m :]), m


@needs_cuda
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_llama_2_7b_shapes_bf16(im, n, k):
    rows = (1, 7, 64, 300)
    x, w, _ = _operands(rows[-1], n, k, torch.bfloat16, seed=n + k, bias=False)
    full = im.invariant_linear(x, w)
    _assert_close(full, im.invariant_linear_reference(x, w), torch.bfloat16)
    for m in rows[:-1]:
        assert torch.equal(im.invariant_linear(x[:m], w), full[:m]), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bmm_matches_reference_and_ignores_its_batch(im, dtype):
    """Attention's products on CUDA: logits against keys [B, N, K], the mix against values
    read transposed (strides (N*K, 1, N)), a shared batch of 1 broadcast; each entry's bits
    the same alone as in any batch."""
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(6, 3, 80, generator=gen).to(dtype).to(DEVICE)
    keys = torch.randn(6, 130, 80, generator=gen).to(dtype).to(DEVICE)
    values = (
        torch.randn(6, 80, 130, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    )  # [B, N, K]
    for b in (keys, keys[:1], values):  # values: a strided view, k-stride 130
        full = im.invariant_bmm(a, b)
        expected = torch.stack(
            [im.invariant_linear_reference(a[i], b[min(i, b.shape[0] - 1)]) for i in range(6)]
        )
        _assert_close(full, expected, dtype)
        for i in (0, 4):
            alone = im.invariant_bmm(a[i : i + 1], b[i : i + 1] if b.shape[0] > 1 else b)
            assert torch.equal(alone[0], full[i]), i
        assert torch.equal(im.invariant_bmm(a[:2], b[:2] if b.shape[0] > 1 else b), full[:2])
    with pytest.raises(ValueError, match="b's batch must be 1 or 6"):
        im.invariant_bmm(a, keys[:2])
    with pytest.raises(ValueError, match=r"expected a \[B, M, K\] and b \[B, N, K\]"):
        im.invariant_bmm(a[0], keys)


def test_bench_shapes_and_rows():
    from thinfer.bench.matmul import parse_shapes, powers_of_two

    shapes = parse_shapes("smollm2, 4096x4096")
    assert len(shapes) == 6 and shapes[-1] == ("llama2-7b q/k/v/o", 4096, 4096)
    assert parse_shapes("4096x4096,llama2-7b,48x80")[:4] == parse_shapes("llama2-7b,48x80")
    assert parse_shapes("48X80") == [("48x80", 48, 80)]
    with pytest.raises(ValueError, match="--shapes: '0x8' is neither"):
        parse_shapes("0x8")
    assert powers_of_two(1) == [1] and powers_of_two(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    with pytest.raises(ValueError, match="--max-m must be >= 1"):
        powers_of_two(0)
