"""The decoder's small ops through the fused Triton kernels (triton backend) vs plain torch.

With the torch backend the model must compute bitwise what the unfused pre-norm block
`x = x + attn(norm(x)); x = x + mlp(norm(x))` computes; with the triton backend SmolLM2 must
pick the same greedy tokens with logits within fp32 tolerance. Without CUDA the kernels run
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). bf16 and fp16 at
GPU speed are checked by the CUDA tests, skipped here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import with_engine
from default_model import require_default_model

from thinfer import LLM, SamplingParams
from thinfer.attention.backend import TORCH_BACKEND
from thinfer.attention.metadata import AttentionMetadata
from thinfer.engine.kv_cache import KVCache
from thinfer.kernels.cpu_native import native_library
from thinfer.models.fused import TORCH_OPS, NativeLayerOps, TritonLayerOps, select_layer_ops
from thinfer.models.rope import apply_rope

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU test needs CUDA")
FP32_LOGITS = {"rtol": 1e-3, "atol": 1e-3}
# Largest relative L2 error of a row of logits between two half-precision paths whose
# roundings differ (fused kernels vs torch, or matmuls of another batch height).
HALF_LOGITS_REL = {"bf16": 3e-2, "fp16": 1e-2}


@pytest.fixture(scope="module")
def triton_llm() -> LLM:
    """SmolLM2 in fp32 with the triton backend (fused ops), a short context."""
    require_default_model()
    return LLM(
        dtype="float32",
        device=str(DEVICE),
        num_kv_blocks=64,
        max_model_len=512,
        attention_backend="triton",
        cuda_graphs=False,
    )


def record_logits(llm: LLM) -> list[torch.Tensor]:
    """Collect the logits of every step `llm`'s engine runs from now on."""
    steps: list[torch.Tensor] = []
    runner = llm.engine.runner
    execute = runner.execute

    def recording(batch: list) -> object:
        out = execute(batch)
        steps.append(out.logits.float().cpu())
        return out

    runner.execute = recording
    return steps


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Every row of `actual` within relative L2 distance `rel` of the row of `expected`: an
    elementwise tolerance would trip on the largest of 10^5 rounding differences."""
    assert actual.shape == expected.shape
    errors = (actual - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(errors.max()) < rel, errors


def prefill_meta(num_tokens: int, cache: KVCache) -> AttentionMetadata:
    """One sequence prefilling `num_tokens` tokens into blocks 0, 1, ... of `cache`."""
    device = cache.storage.device
    slots = torch.arange(num_tokens, device=device)
    return AttentionMetadata(
        slot_mapping=slots,
        block_tables=torch.arange(cache.num_blocks, device=device)[None],
        context_lens=torch.tensor([num_tokens], device=device),
        context_lens_list=[num_tokens],
        query_lens_list=[num_tokens],
        query_starts_list=[0],
        num_decodes=0,
        block_size=cache.block_size,
    )


def unfused_forward(model: torch.nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The decoder as written before the residual flow was restructured (torch math)."""
    meta = prefill_meta(len(ids), cache)
    positions = torch.arange(len(ids), device=ids.device)
    angles = model.rotary_emb.angles(positions)

    def rotate(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, angles)

    x = model.embed_tokens(ids)
    for layer, kv in zip(model.layers, cache.layer_caches(), strict=True):
        x = x + layer.self_attn(layer.input_layernorm(x), rotate, kv, meta)
        gate_up = layer.mlp.gate_up_proj(layer.post_attention_layernorm(x))
        gate, up = gate_up.split(model.config.intermediate_size, dim=-1)
        x = x + layer.mlp.down_proj(F.silu(gate) * up)
    return model.norm(x)


def test_layer_ops_follow_the_attention_backend(llm, triton_llm):
    # torch attention: the native C ops on a CPU that builds them (tests/test_cpu_layer_ops.py)
    native = DEVICE.type == "cpu" and native_library() is not None
    auto = select_layer_ops("auto", TORCH_BACKEND, DEVICE)
    assert isinstance(auto, NativeLayerOps) if native else auto is TORCH_OPS
    assert type(llm.engine.model.ops) is type(auto)
    fused = triton_llm.engine.model
    assert isinstance(fused.ops, TritonLayerOps)
    for layer in fused.layers:
        assert layer.ops is fused.ops and layer.mlp.ops is fused.ops


@torch.inference_mode()
def test_torch_path_is_bitwise_the_unfused_decoder(llm):
    """The restructured residual flow changes nothing on the torch path (the layer ops set
    to plain torch for the test: the engine's CPU default is the native ops)."""
    model = llm.engine.model
    param = next(model.parameters())
    ids = torch.tensor(llm.tokenizer.encode("The capital of France is Paris, and"))
    caches = [KVCache(model.config, 4, 16, param.dtype, param.device) for _ in range(2)]
    expected = unfused_forward(model, ids, caches[0])
    meta = prefill_meta(len(ids), caches[1])
    default_ops = model.ops
    model.set_layer_ops(TORCH_OPS)
    try:
        hidden = model(ids, torch.arange(len(ids)), caches[1].layer_caches(), meta)
    finally:
        model.set_layer_ops(default_ops)
    assert torch.equal(hidden, expected)
    assert torch.equal(caches[1].storage, caches[0].storage)


def test_fused_model_matches_torch_greedy(llm, triton_llm, english_prompts):
    """Two prompts, a prefill step and three decode steps: same greedy tokens, and every
    step's logits within fp32 tolerance of the torch path's."""
    prompts = [llm.tokenizer.encode(p)[:8] for p in english_prompts[:2]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    torch_llm = with_engine(llm, num_kv_blocks=64)
    fused_llm = with_engine(triton_llm, num_kv_blocks=64)
    expected_logits, logits = record_logits(torch_llm), record_logits(fused_llm)
    expected = [out.outputs[0].token_ids for out in torch_llm.generate(prompts, params)]
    tokens = [out.outputs[0].token_ids for out in fused_llm.generate(prompts, params)]
    assert tokens == expected
    assert len(logits) == len(expected_logits) == 4
    for step, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(step, want, **FP32_LOGITS)


# ----- GPU: bf16 and fp16 weights through the fused path --------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_fused_model_matches_torch_backend(dtype):
    """The tiny dummy preset in half precision, forced through the same tokens on both
    paths (Llama-2-7B widths run in tests/test_decode_graphs.py)."""
    kwargs = dict(model="tiny", load_format="dummy", dtype=dtype, device="cuda", num_kv_blocks=64)
    fused = LLM(**kwargs, attention_backend="triton", cuda_graphs=False)
    plain = LLM(**kwargs, attention_backend="torch")
    forced = [5, 17, 200, 3, 99]
    params = SamplingParams(max_tokens=5, forced_tokens=forced, ignore_eos=True)
    prompts = [[1, 7, 8, 9, 10, 11], [1, 300, 301]]
    expected_logits, logits = record_logits(plain), record_logits(fused)
    plain.generate(prompts, params)
    fused.generate(prompts, params)
    assert len(logits) == len(expected_logits) == 5
    for step, want in zip(logits, expected_logits, strict=True):
        assert_rows_close(step, want, HALF_LOGITS_REL[dtype])
