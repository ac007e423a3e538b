"""Fused element-wise Triton kernels (RMSNorm + residual, RoPE, SiLU-multiply) vs torch.

Without CUDA the kernels run through the Triton interpreter on small shapes. The interpreter
rounds float32 -> bfloat16 by truncation (a GPU rounds to nearest even), so bf16 comparisons
on CPU allow one more unit in the last place; fp32 and fp16 round exactly as on a GPU.
GPU tests at real model shapes are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the kernel imports: @triton.jit picks the interpreter when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from thinfer.kernels.rmsnorm import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from thinfer.kernels.rope import apply_rope_inplace, apply_rope_reference  # noqa: E402
from thinfer.kernels.silu_mul import silu_and_mul, silu_and_mul_reference  # noqa: E402
from thinfer.models.norm import RMSNorm  # noqa: E402
from thinfer.models.rope import RotaryEmbedding, apply_rope  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU test at real shapes needs CUDA")


def ulps(dtype: torch.dtype, half_count: float) -> dict[str, float]:
    """assert_close tolerances of `half_count` units in the last place at magnitude 1 for half
    dtypes; float32 results (summed in a different order) get 16."""
    count = half_count if dtype.itemsize < 4 else 16
    if dtype == torch.bfloat16 and not HAS_CUDA:
        count += 1  # interpreter truncates instead of rounding to nearest
    eps = torch.finfo(dtype).eps
    return {"rtol": count * eps, "atol": count * eps}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tolerance: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance)


def assert_rounds_alike(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """For half dtypes where rounding is faithful, the kernel rounds where the reference does:
    beyond rare last-bit ties from summation order, results are bitwise equal (an extra or a
    missing rounding step leaves about a quarter of the elements different)."""
    if actual.dtype == torch.float16 or (actual.dtype == torch.bfloat16 and HAS_CUDA):
        assert (actual == expected).float().mean().item() >= 0.99


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def norm_inputs(tokens: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x with row scales from 8 down to 1e-3 (where eps dominates), a residual, a weight."""
    scales = torch.logspace(0.9, -3, tokens).unsqueeze(1).to(DEVICE)
    x = (randn(tokens, hidden, dtype=torch.float32, seed=1) * scales).to(dtype)
    residual = randn(tokens, hidden, dtype=dtype, seed=2)
    weight = (0.5 + torch.rand(hidden, generator=torch.Generator().manual_seed(3))).to(DEVICE)
    return x, residual, weight.to(dtype)


# ---- RMSNorm ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_references_are_the_model_module(dtype: torch.dtype) -> None:
    x, residual, weight = norm_inputs(5, 576, dtype)
    module = RMSNorm(576, 1e-5).to(device=DEVICE, dtype=dtype)
    module.weight.data.copy_(weight)
    assert torch.equal(rms_norm_reference(x, weight, 1e-5), module(x))
    normed, summed = fused_add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, residual + x)
    assert torch.equal(normed, module(residual + x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 576])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int, tokens: int) -> None:
    x, _, weight = norm_inputs(tokens, hidden, dtype)
    actual, expected = rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5)
    assert_close(actual, expected, **ulps(dtype, 2))
    assert_rounds_alike(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 576])
@pytest.mark.parametrize("tokens", [1, 37])
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype, hidden: int, tokens: int) -> None:
    x, residual, weight = norm_inputs(tokens, hidden, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_summed = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    if dtype == torch.bfloat16 and not HAS_CUDA:
        assert_close(summed, expected_summed, **ulps(dtype, 0))
    else:
        assert torch.equal(summed, expected_summed)  # one rounding of an exact sum
    assert_close(normed, expected_normed, **ulps(dtype, 2))
    assert_rounds_alike(normed, expected_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_strided_and_batched_inputs() -> None:
    wide = randn(6, 700, dtype=torch.float32, seed=4)
    x = wide[:, 50:626]  # row stride 700, not 576
    residual = randn(2, 3, 576, dtype=torch.float32, seed=5)
    weight = randn(576, dtype=torch.float32, seed=6)
    tol = ulps(torch.float32, 16)
    assert_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), **tol)
    normed, summed = fused_add_rms_norm(x.reshape(2, 3, 576), residual, weight, 1e-5)
    expected_normed, expected_summed = fused_add_rms_norm_reference(
        x.reshape(2, 3, 576), residual, weight, 1e-5
    )
    assert torch.equal(summed, expected_summed)
    assert_close(normed, expected_normed, **tol)


def test_rms_norm_rejects_mismatched_weight_and_accepts_no_tokens() -> None:
    x = randn(3, 64, dtype=torch.float32, seed=7)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(32, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x, torch.ones(64, device=DEVICE, dtype=torch.float16), 1e-5)
    empty = x[:0]
    assert rms_norm(empty, torch.ones(64, device=DEVICE), 1e-5).shape == (0, 64)


# ---- RoPE -------------------------------------------------------------------------------


def fused_qkv(tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype) -> tuple:
    """q, k, v as strided views of one projection output, as the attention layer makes them."""
    num_q, num_kv = heads
    qkv = randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=8)
    q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    return qkv, (
        q.view(tokens, num_q, head_dim),
        k.view(tokens, num_kv, head_dim),
        v.view(tokens, num_kv, head_dim),
    )


def unsorted_positions(tokens: int, limit: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tokens)
    return torch.randperm(limit, generator=gen)[:tokens].to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_reference_is_the_model_rotation(dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(64, 512, 1e5, None, dtype, DEVICE)
    _, (q, k, _) = fused_qkv(7, (9, 3), 64, dtype)
    positions = unsorted_positions(7, 512)
    expected = apply_rope(q, k, rope.angles(positions))
    actual = apply_rope_reference(q, k, positions, rope.cos, rope.sin)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("position_dtype", [torch.int64, torch.int32])
def test_rope_inplace_matches_reference(
    dtype: torch.dtype, tokens: int, position_dtype: torch.dtype
) -> None:
    rope = RotaryEmbedding(64, 2048, 1e5, None, dtype, DEVICE)
    qkv, (q, k, v) = fused_qkv(tokens, (9, 3), 64, dtype)
    v_before = v.clone()
    positions = unsorted_positions(tokens, 2048, position_dtype)
    exact = apply_rope_reference(
        q.float(), k.float(), positions, rope.cos.float(), rope.sin.float()
    )
    model_path = apply_rope_reference(q, k, positions, rope.cos, rope.sin)
    apply_rope_inplace(q, k, positions, rope.cos, rope.sin)
    for actual, fp32, same_dtype in zip((q, k), exact, model_path, strict=True):
        assert_close(actual, fp32.to(dtype), **ulps(dtype, 1))
        assert_rounds_alike(actual, fp32.to(dtype))
        assert_close(actual, same_dtype, **ulps(dtype, 3))
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_reads_both_table_halves_at_odd_head_dim(dtype: torch.dtype) -> None:
    """Generic tables (halves differ) and head_dim 80: catches half/column mix-ups."""
    q = randn(5, 5, 80, dtype=dtype, seed=9)
    k = randn(5, 1, 80, dtype=dtype, seed=10)
    cos_table, sin_table = randn(64, 80, dtype=dtype, seed=11), randn(64, 80, dtype=dtype, seed=12)
    positions = unsorted_positions(5, 64)
    expected = apply_rope_reference(
        q.float(), k.float(), positions, cos_table.float(), sin_table.float()
    )
    apply_rope_inplace(q, k, positions, cos_table, sin_table)
    for actual, fp32 in zip((q, k), expected, strict=True):
        assert_close(actual, fp32.to(dtype), **ulps(dtype, 1))


def test_rope_rejects_bad_shapes() -> None:
    q, k = (
        randn(2, 4, 6, dtype=torch.float32, seed=13),
        randn(2, 2, 6, dtype=torch.float32, seed=14),
    )
    table = randn(8, 6, dtype=torch.float32, seed=15)
    with pytest.raises(ValueError, match="positions"):
        apply_rope_inplace(q, k, torch.zeros(3, dtype=torch.int64, device=DEVICE), table, table)
    odd = randn(2, 4, 5, dtype=torch.float32, seed=16)
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope_inplace(
            odd, odd[:, :2], torch.zeros(2, dtype=torch.int64, device=DEVICE), table, table
        )


# ---- SiLU-multiply ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [100, 1536])
@pytest.mark.parametrize("tokens", [1, 37])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, intermediate: int, tokens: int) -> None:
    wide = randn(tokens, 2 * intermediate + 8, dtype=dtype, seed=17, scale=3.0)
    gate_up = wide[:, 8:]  # strided rows, gate in [0, I), up in [I, 2I)
    out = silu_and_mul(gate_up)
    fp32 = silu_and_mul_reference(gate_up, torch.float32)
    same_dtype = silu_and_mul_reference(gate_up, dtype)
    assert_close(out, fp32, **ulps(dtype, 1))
    assert_rounds_alike(out, fp32)
    assert_close(out, same_dtype, **ulps(dtype, 3))


def test_silu_and_mul_keeps_leading_dims_and_rejects_odd_width() -> None:
    gate_up = randn(2, 3, 20, dtype=torch.float32, seed=18)
    out = silu_and_mul(gate_up)
    assert_close(out, silu_and_mul_reference(gate_up, torch.float32), **ulps(torch.float32, 16))
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(gate_up[..., :19])


# ---- GPU, real shapes (Llama-2-7B / Llama-3-8B) -----------------------------------------


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_gpu_rms_norm_real_shapes(tokens: int) -> None:
    x, residual, weight = norm_inputs(tokens, 4096, torch.bfloat16)
    actual, expected = rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5)
    assert_close(actual, expected, **ulps(torch.bfloat16, 2))
    assert_rounds_alike(actual, expected)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = fused_add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_summed)
    assert_close(normed, expected_normed, **ulps(torch.bfloat16, 2))
    assert_rounds_alike(normed, expected_normed)


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 4096])
@pytest.mark.parametrize("kv_heads", [32, 8])
def test_gpu_rope_real_shapes(tokens: int, kv_heads: int) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    rope = RotaryEmbedding(128, 8192, 5e5, scaling, torch.bfloat16, DEVICE)
    _, (q, k, _) = fused_qkv(tokens, (32, kv_heads), 128, torch.bfloat16)
    positions = unsorted_positions(tokens, 8192)
    exact = apply_rope_reference(
        q.float(), k.float(), positions, rope.cos.float(), rope.sin.float()
    )
    apply_rope_inplace(q, k, positions, rope.cos, rope.sin)
    for actual, fp32 in zip((q, k), exact, strict=True):
        assert_close(actual, fp32.to(torch.bfloat16), **ulps(torch.bfloat16, 1))
        assert_rounds_alike(actual, fp32.to(torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_gpu_silu_and_mul_real_shapes(tokens: int) -> None:
    gate_up = randn(tokens, 2 * 11008, dtype=torch.bfloat16, seed=19, scale=3.0)
    expected = silu_and_mul_reference(gate_up, torch.float32)
    actual = silu_and_mul(gate_up)
    assert_close(actual, expected, **ulps(torch.bfloat16, 1))
    assert_rounds_alike(actual, expected)
