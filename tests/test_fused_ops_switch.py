"""The fused small ops have their own switch: `LLM(fused_ops=...)`, `EngineConfig.fused_ops`,
`--fused-ops {auto,on,off}`. "auto" follows the attention backend (fused exactly with
triton), True and False override it, and a request the machine cannot honour is a ValueError.

The tiny dummy preset keeps these fast; without CUDA the kernels run through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

import thinfer.kernels
from thinfer import LLM, SamplingParams
from thinfer.attention.backend import TORCH_BACKEND, select_backend
from thinfer.cli_args import add_model_args, llm_kwargs
from thinfer.config import EngineConfig
from thinfer.kernels import rmsnorm
from thinfer.kernels.cpu_native import native_library
from thinfer.models import fused
from thinfer.models.fused import TORCH_OPS, NativeLayerOps, TritonLayerOps, select_layer_ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 300, 301]]
# "auto" with torch attention: the native C ops on a CPU that runs them, else plain torch
AUTO_TORCH_OPS = NativeLayerOps if DEVICE.type == "cpu" and native_library() else type(TORCH_OPS)


def tiny(**kwargs: object) -> LLM:
    return LLM(
        model="tiny",
        load_format="dummy",
        dtype="float32",
        device=str(DEVICE),
        num_kv_blocks=32,
        cuda_graphs=False,
        **kwargs,  # type: ignore[arg-type]
    )


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, params)]


def uses_fused_ops(llm: LLM) -> bool:
    model = llm.engine.model
    ops = model.ops
    assert all(layer.ops is ops and layer.mlp.ops is ops for layer in model.layers)
    return isinstance(ops, TritonLayerOps)


def test_auto_follows_the_attention_backend():
    triton_backend = select_backend("triton", DEVICE)
    assert type(select_layer_ops("auto", TORCH_BACKEND, DEVICE)) is AUTO_TORCH_OPS
    assert isinstance(select_layer_ops("auto", triton_backend, DEVICE), TritonLayerOps)
    assert select_layer_ops(False, triton_backend, DEVICE) is TORCH_OPS
    assert isinstance(select_layer_ops(True, TORCH_BACKEND, DEVICE), TritonLayerOps)
    assert EngineConfig().fused_ops == "auto"
    assert not uses_fused_ops(tiny(attention_backend="torch"))
    auto = tiny(attention_backend="triton")
    assert uses_fused_ops(auto) and auto.engine.model.attention_backend.name == "triton"


def test_off_with_the_triton_backend_keeps_the_torch_ops(monkeypatch):
    llm = tiny(attention_backend="triton", fused_ops=False)
    assert llm.engine.model.attention_backend.name == "triton"
    assert llm.engine.model.ops is TORCH_OPS

    def not_called(*args: object) -> None:
        raise AssertionError("a fused kernel ran with fused_ops=False")

    monkeypatch.setattr(rmsnorm, "fused_add_rms_norm", not_called)
    monkeypatch.setattr(rmsnorm, "rms_norm", not_called)
    assert len(greedy(llm)[0]) == 3


def test_on_with_the_torch_backend_fuses_only_the_small_ops():
    """Fused small ops under torch attention pick the torch-only path's greedy tokens."""
    plain = tiny(attention_backend="torch")
    forced = tiny(attention_backend="torch", fused_ops=True)
    assert forced.engine.model.attention_backend is TORCH_BACKEND
    assert uses_fused_ops(forced)
    assert greedy(forced) == greedy(plain)


def test_bad_values_raise():
    with pytest.raises(ValueError, match="fused_ops must be 'auto', True or False, got 'on'"):
        EngineConfig(fused_ops="on")
    with pytest.raises(ValueError, match="fused_ops must be 'auto', True or False, got 1"):
        EngineConfig(fused_ops=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused_ops must be"):
        tiny(fused_ops="yes")
    with pytest.raises(ValueError, match="fused_ops must be"):
        select_layer_ops("always", TORCH_BACKEND, DEVICE)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
def test_fused_ops_on_cpu_need_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    assert fused.fused_kernels_interpreted()  # conftest set TRITON_INTERPRET=1
    monkeypatch.setattr(fused, "fused_kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match="fused ops need a CUDA device, got 'cpu'"):
        select_layer_ops(True, TORCH_BACKEND, cpu)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tiny(attention_backend="torch", fused_ops=True)
    assert type(select_layer_ops("auto", TORCH_BACKEND, cpu)) is AUTO_TORCH_OPS  # no Triton
    assert select_layer_ops(False, TORCH_BACKEND, cpu) is TORCH_OPS


def test_fused_ops_without_triton(monkeypatch):
    """As if triton were missing: the kernel modules cannot be imported."""
    monkeypatch.delattr(thinfer.kernels, "rmsnorm")
    monkeypatch.setitem(sys.modules, "thinfer.kernels.rmsnorm", None)
    with pytest.raises(ValueError, match="fused ops need triton, which cannot be imported"):
        select_layer_ops(True, TORCH_BACKEND, DEVICE)
    assert select_layer_ops(False, TORCH_BACKEND, DEVICE) is TORCH_OPS


def test_cli_fused_ops_flag():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert llm_kwargs(parser.parse_args([]))["fused_ops"] == "auto"
    assert llm_kwargs(parser.parse_args(["--fused-ops", "on"]))["fused_ops"] is True
    assert llm_kwargs(parser.parse_args(["--fused-ops", "off"]))["fused_ops"] is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--fused-ops", "yes"])
