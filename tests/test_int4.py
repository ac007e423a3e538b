"""Weight-only int4 on the CPU: the codes recover a Q4_1-style grid exactly, the kernel
matches its fp32 reference within bf16 rounding, only the layers it can take are quantized
(never lm_head), bad settings are refused, and the default model (Q4_1 GGUF) keeps its greedy
text with int4."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from thinfer import LLM, SamplingParams
from thinfer.cli_args import add_model_args, llm_kwargs
from thinfer.models.int4 import (
    GROUP,
    dequantize_int4_reference,
    int4_linear,
    int4_supported,
    quantize_int4,
)
from thinfer.models.int8 import dequantize_int8_reference, int8_supported
from thinfer.models.linear import Linear, quantize_linears


def _q4_1_grid(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight on a Q4_1 grid: per 32 values along K, w = d * q + m with q in [0, 15],
    each group using both 0 and 15 (as the GGUF's blocks usually do)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, k // GROUP, 1, generator=gen) * 0.01 + 1e-3
    m = torch.randn(n, k // GROUP, 1, generator=gen) * 0.05
    return (d * q + m).reshape(n, k)


def test_codes_recover_a_q4_1_grid_exactly():
    weight = _q4_1_grid(48, 96)
    assert torch.allclose(dequantize_int4_reference(weight), weight, atol=1e-7, rtol=0)
    random = torch.randn(48, 96)  # off the grid: at most half a step per value
    step = (random.reshape(48, 3, GROUP).amax(-1) - random.reshape(48, 3, GROUP).amin(-1)) / 15
    error = (dequantize_int4_reference(random) - random).abs().reshape(48, 3, GROUP)
    assert (error <= step[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 5])
def test_kernel_matches_its_reference(rows):
    weight = _q4_1_grid(64, 128, seed=rows)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(64)
    packed, scales = quantize_int4(weight)
    out = int4_linear(x, packed, scales, bias)
    expected = F.linear(x, dequantize_int4_reference(weight), bias)
    assert out.dtype == torch.float32 and out.shape == (rows, 64)
    # bf16 activations and scales inside: relative to the output's scale
    assert (out - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_only_what_the_kernel_takes_is_quantized():
    model = torch.nn.Module()
    model.proj = Linear(64, 32)
    model.odd = Linear(48, 8)  # K not a multiple of 32: no int4, int8 (K % 16 == 0)
    model.odder = Linear(40, 8)  # K not a multiple of 16: neither kernel, stays fp32
    model.lm_head = Linear(64, 100)  # the output layer: int8, finer than int4
    for module in (model.proj, model.odd, model.odder, model.lm_head):
        module.weight.data.normal_()
    assert quantize_linears(model, "int4") == 3
    kinds = [m.quantized.kind for m in (model.proj, model.odd, model.lm_head)]
    assert kinds == ["int4", "int8", "int8"]  # int8 where int4 cannot or should not go
    assert not int4_supported(torch.zeros(8, 48)) and not int8_supported(torch.zeros(8, 40))
    x = torch.randn(3, 64)
    expected = F.linear(x, dequantize_int4_reference(model.proj.weight))
    assert (model.proj(x) - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert model.odder.quantized is None
    x = torch.randn(3, 48)
    expected = F.linear(x, dequantize_int8_reference(model.odd.weight))
    assert (model.odd(x) - expected).abs().max() <= 1e-2 * expected.abs().max()
    model.proj.unpack()  # editing weights drops the quantized copy
    assert model.proj.quantized is None
    assert quantize_linears(model, "int8") == 3
    assert {m.quantized.kind for m in (model.proj, model.odd, model.lm_head)} == {"int8"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        LLM(model="tiny", load_format="dummy", device="cpu", quantization="int3")
    with pytest.raises(ValueError, match="runs fp32 models on the CPU, got torch.float16"):
        LLM(model="tiny", load_format="dummy", device="cpu", dtype="float16", quantization="int4")
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert llm_kwargs(parser.parse_args([]))["quantization"] is None
    assert llm_kwargs(parser.parse_args(["--quantization", "int4"]))["quantization"] == "int4"


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_default_model_keeps_its_text(llm, method):
    """SmolLM2's GGUF is Q4_1, so int4 serves its own weights (int8, a finer grid, nearly);
    bf16 activations and the int8 lm_head differ a little. Greedy agreement is reported, the
    first tokens must match."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "Photosynthesis is the process by which"]
    quantized = LLM(quantization=method, num_kv_blocks=64)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in quantized.generate(prompts, params)]
    same = sum(a == b for x, y in zip(expected, got) for a, b in zip(x, y))
    print(f"{method} greedy agreement with fp32: {same}/{sum(map(len, expected))}")
    assert all(x[:4] == y[:4] for x, y in zip(expected, got))
