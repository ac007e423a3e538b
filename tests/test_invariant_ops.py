"""The deterministic mode's small ops and their start-up checks (`thinfer.models.
invariant_ops`, `thinfer.attention.invariant_paged.check_bmm_rows`): RMSNorm row-invariant on
the CPU path and in the Triton kernel the CUDA path runs (interpreted here), the checks pass
on this machine and catch an op whose rows depend on the batch."""

from __future__ import annotations

import pytest
import torch

from thinfer.attention import invariant_paged, native_invariant
from thinfer.kernels.cpu_native import native_library
from thinfer.models.fused import NativeLayerOps
from thinfer.models.invariant_ops import (
    INVARIANT_OPS,
    check_exp_is_pointwise,
    check_norm_rows,
    check_silu_rows,
)
from thinfer.models.norm import RMSNorm

needs_native = pytest.mark.skipif(native_library() is None, reason="native CPU kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checks_pass_here(dtype):
    check_norm_rows(96, dtype, torch.device("cpu"))
    check_exp_is_pointwise(torch.device("cpu"), torch.float32)
    invariant_paged.check_bmm_rows(16, 3, dtype, torch.device("cpu"))


def test_norm_check_catches_rows_that_depend_on_the_batch(monkeypatch):
    real = INVARIANT_OPS.rms_norm

    def batch_dependent(x, norm):  # a reduction whose result shifts with the row count
        return real(x, norm) * (1 + 1e-3 * (x.shape[0] > 16))

    monkeypatch.setattr(INVARIANT_OPS, "rms_norm", batch_dependent)
    with pytest.raises(RuntimeError, match=r"RMSNorm \(invariant ops\) on cpu torch.float32"):
        check_norm_rows(64, torch.float32, torch.device("cpu"))


@needs_native
def test_native_checks_pass_here_and_catch_batch_dependence(monkeypatch):
    """The native ops and attention the mode runs on this CPU pass; a SiLU or an attention
    whose rows shift with the row count is caught."""
    cpu, ops = torch.device("cpu"), NativeLayerOps()
    check_norm_rows(96, torch.float32, cpu, ops)
    check_silu_rows(100, torch.float32, cpu, ops)
    native_invariant.check_native_rows(6, 2, 16)
    real_silu = ops.silu_mul
    monkeypatch.setattr(ops, "silu_mul", lambda g: real_silu(g) * (1 + 1e-3 * (g.shape[0] > 8)))
    with pytest.raises(RuntimeError, match=r"SiLU \(native ops\) on cpu"):
        check_silu_rows(100, torch.float32, cpu, ops)
    real_attention = native_invariant.native_decode_attention

    def batch_dependent(q, *args):
        return real_attention(q, *args) * (1 + 1e-3 * (q.shape[0] > 1))

    monkeypatch.setattr(native_invariant, "native_decode_attention", batch_dependent)
    with pytest.raises(RuntimeError, match="native CPU attention gives a row other bits"):
        native_invariant.check_native_rows(6, 2, 16)


def test_bf16_cpu_norm_matches_the_module_closely():
    norm = RMSNorm(96, 1e-5).to(torch.bfloat16)
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    torch.testing.assert_close(INVARIANT_OPS.rms_norm(x, norm), norm(x), rtol=1e-2, atol=1e-2)
    normed, residual = INVARIANT_OPS.add_rms_norm(x, x, norm)
    assert torch.equal(residual, x + x)
    torch.testing.assert_close(normed, norm(x + x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_norm_rows_do_not_depend_on_the_batch(dtype):
    """The kernel the mode runs on CUDA: one program per row, whatever the row count."""
    rmsnorm = pytest.importorskip("thinfer.kernels.rmsnorm")
    gen = torch.Generator().manual_seed(4)
    x, residual = (torch.randn(40, 96, generator=gen).to(dtype) for _ in "xr")
    weight = (torch.rand(96, generator=gen) + 0.5).to(dtype)
    full = rmsnorm.rms_norm(x, weight, 1e-5)
    fused, summed = rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-5)
    for rows in (1, 3, 17):
        assert torch.equal(rmsnorm.rms_norm(x[:rows].clone(), weight, 1e-5), full[:rows])
        alone = rmsnorm.fused_add_rms_norm(x[:rows].clone(), residual[:rows].clone(), weight, 1e-5)
        assert torch.equal(alone[0], fused[:rows]) and torch.equal(alone[1], summed[:rows])


def test_cuda_code_paths_keep_a_request_the_same_in_any_batch(monkeypatch):
    """The mode's CUDA paths (Triton linears with a tuned plan, norms and attention through
    the kernels), interpreted on the CPU on a tiny dummy model: a greedy request alone and
    beside two others with its prefill in 7-token chunks and the pool small enough to
    preempt gives the same ids and logprobs, bitwise."""
    invariant_matmul = pytest.importorskip("thinfer.kernels.invariant_matmul")
    from thinfer import LLM, SamplingParams
    from thinfer.kernels import invariant_tiles

    monkeypatch.setattr("thinfer.kernels.placement.TRITON_ON_CPU", True)
    monkeypatch.setattr(invariant_matmul, "_PLANS", {})
    tiles = (invariant_matmul.Tiles(16, 32, 32, 4, 2), invariant_matmul.Tiles(64, 64, 64, 4, 3))
    monkeypatch.setattr(invariant_tiles, "CANDIDATES", tiles)
    monkeypatch.setattr(invariant_tiles, "BUCKETS", (1, 16))
    base = LLM("tiny", load_format="dummy", dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(5)
    vocab = base.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (19, 11, 23)]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, logprobs=1, ignore_eos=True)
    alone = LLM(base.loaded, deterministic=True, num_kv_blocks=64).generate(prompts[:1], greedy)
    busy = LLM(
        base.loaded,
        deterministic=True,
        num_kv_blocks=8,
        block_size=8,
        max_num_seqs=3,
        max_num_batched_tokens=7,
    )
    others = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    beside = busy.generate(prompts[1:2] + prompts[:1] + prompts[2:], [others, greedy, others])
    assert busy.engine.num_preemptions > 0
    assert invariant_matmul._PLANS  # the linears ran the tuned Triton plan
    mine, theirs = alone[0].outputs[0], beside[1].outputs[0]
    assert mine.token_ids == theirs.token_ids and mine.logprobs == theirs.logprobs
