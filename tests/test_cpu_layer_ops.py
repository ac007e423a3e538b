"""The native CPU layer ops (`NativeLayerOps`, C kernels of thinfer/kernels/cpu/layer_ops.c)
against the torch path they replace: RoPE bitwise, add + RMSNorm and silu-multiply within
fp32 rounding, and a model's greedy tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from thinfer import LLM, SamplingParams
from thinfer.kernels.cpu_native import native_library
from thinfer.models.fused import TORCH_OPS, NativeLayerOps
from thinfer.models.norm import RMSNorm
from thinfer.models.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(native_library() is None, reason="no native CPU kernels here")
NATIVE = NativeLayerOps()


@pytest.mark.parametrize("rows", [1, 5])
def test_norms_match_torch(rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=gen)
    x, residual = torch.randn(rows, 96, generator=gen), torch.randn(rows, 96, generator=gen) * 30
    got, got_residual = NATIVE.add_rms_norm(x, residual, norm)
    want, want_residual = TORCH_OPS.add_rms_norm(x, residual, norm)
    assert torch.equal(got_residual, want_residual)  # one fp32 add either way
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(NATIVE.rms_norm(x, norm), TORCH_OPS.rms_norm(x, norm))
    half = x.half()  # other dtypes take the torch path
    assert torch.equal(NATIVE.rms_norm(half, norm), TORCH_OPS.rms_norm(half, norm))


def test_rope_in_place_on_projection_views_is_bitwise_torch():
    rotary = RotaryEmbedding(16, 64, 10000.0, None, torch.float32, torch.device("cpu"))
    qkv = torch.randn(3, 4 * 16 + 2 * 2 * 16, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 17, 63])
    q, k, v = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(3, 4, 16), k.view(3, 2, 16)
    want_q, want_k = TORCH_OPS.rotation(rotary, positions)(q.clone(), k.clone())
    value_before = v.clone()
    got_q, got_k = NATIVE.rotation(rotary, positions)(q, k)
    assert got_q.data_ptr() == qkv.data_ptr()  # rotated where it lies
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(v, value_before)
    with pytest.raises(ValueError, match="contiguous heads"):
        NATIVE.rotation(rotary, positions)(q.transpose(1, 2), k)


def test_silu_mul_matches_torch():
    # width 44: five 8-lane vectors and a scalar tail; gates past exp's range saturate
    gate_up = torch.randn(7, 2 * 44, generator=torch.Generator().manual_seed(1)) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -30.0])
    torch.testing.assert_close(NATIVE.silu_mul(gate_up), TORCH_OPS.silu_mul(gate_up))


def test_model_greedy_tokens_unchanged():
    def greedy(fused_ops: object) -> list[list[int]]:
        llm = LLM(
            model="tiny", load_format="dummy", device="cpu", num_kv_blocks=32, fused_ops=fused_ops
        )  # type: ignore[arg-type]
        assert isinstance(llm.engine.model.ops, NativeLayerOps) == (fused_ops == "auto")
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outputs = llm.generate([[1, 7, 8, 9], [1, 300, 301, 5, 6, 7, 8]], params)
        return [out.outputs[0].token_ids for out in outputs]

    assert greedy("auto") == greedy(False)
