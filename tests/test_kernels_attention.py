"""Triton paged attention kernels and the triton attention backend vs the torch backend.

Without CUDA the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on small shapes: fp32 and fp16. The interpreter's tl.dot mishandles
bfloat16 operands, so bf16 attention is checked only by the GPU tests at real shapes
(Llama-2-7B: 32 heads, head_dim 128, block_size 16, contexts 1k-8k), skipped without CUDA.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pytest
import torch

import thinfer.attention
from thinfer.attention import torch_paged, triton_paged
from thinfer.attention.backend import TORCH_BACKEND, select_backend
from thinfer.attention.capture import AttentionCapture
from thinfer.attention.metadata import AttentionMetadata
from thinfer.cli_args import add_model_args, llm_kwargs
from thinfer.config import EngineConfig
from thinfer.kernels.decode_attention import (
    DECODE_SPLIT_TOKENS,
    decode_split_partials,
    paged_decode_attention,
)
from thinfer.kernels.prefill_attention import paged_prefill_attention
from thinfer.kernels.store_kv import store_kv
from thinfer.sampling_params import SamplingParams

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU test at real shapes needs CUDA")
HEAD_DIM = 64
LOG2E = math.log2(math.e)
# Kernel vs reference computed in fp32 from the same (rounded) inputs.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def random_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k.to(DEVICE), v.to(DEVICE)


def shuffled_tables(
    context_lens: list[int], block_size: int, num_blocks: int, seed: int = 0
) -> torch.Tensor:
    """Disjoint, randomly ordered blocks per sequence, padded with 0 to the widest."""
    needed = [math.ceil(c / block_size) for c in context_lens]
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    rows, used = [], 0
    for n in needed:
        rows.append(order[used : used + n] + [0] * (max(needed) - n))
        used += n
    assert used <= num_blocks
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


def reference_decode(q, k_cache, v_cache, tables, context_lens, scale):
    """torch_paged.decode_attention in fp32 on the same inputs."""
    lens = torch.tensor(context_lens, device=DEVICE)
    return torch_paged.decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, lens, max(context_lens), scale
    )


def run_decode(q, k_cache, v_cache, tables, context_lens, **kwargs):
    lens = torch.tensor(context_lens, device=DEVICE)
    return paged_decode_attention(q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_matches_reference(dtype):
    k_cache, v_cache = random_cache(8, 16, 3, dtype)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(5, 3, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(5, 3, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    slots = torch.tensor([3, 77, 16, 127, 40], device=DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_paged.store_kv(k, v, expected_k, expected_v, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (1, 4)])
def test_decode_matches_reference_over_several_splits(dtype, num_kv_heads, group):
    context_lens = [1, 37, 150]  # not multiples of the block (16) or split (32) size
    k_cache, v_cache = random_cache(24, 16, num_kv_heads, dtype)
    tables = shuffled_tables(context_lens, 16, 24)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, num_kv_heads * group, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
    out = run_decode(q, k_cache, v_cache, tables, context_lens, split_tokens=32)
    expected = reference_decode(q, k_cache, v_cache, tables, context_lens, HEAD_DIM**-0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


def test_decode_with_small_blocks_and_default_split():
    """Block size 8: one 64-key tile spans several non-contiguous blocks."""
    context_lens = [70, 9]
    k_cache, v_cache = random_cache(16, 8, 2, torch.float32)
    tables = shuffled_tables(context_lens, 8, 16, seed=3)
    q = torch.randn(2, 4, HEAD_DIM, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = run_decode(q, k_cache, v_cache, tables, context_lens)
    assert DECODE_SPLIT_TOKENS >= 70
    expected = reference_decode(q, k_cache, v_cache, tables, context_lens, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


def torch_unified_partials(q, k_cache, v_cache, table, context_len, split_tokens, phi):
    """The unified-max partials of one sequence in plain torch: per query head and chunk,
    acc = sum 2^(x - phi*log2e) v and sum = sum 2^(x - phi*log2e), x = q.k scale log2e."""
    keys = torch_paged.gather_kv(k_cache, table, context_len).float()
    values = torch_paged.gather_kv(v_cache, table, context_len).float()
    group = q.shape[0] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    x = torch.einsum("hd,shd->hs", q.float(), keys) * HEAD_DIM**-0.5 * LOG2E
    p = torch.exp2(x - phi * LOG2E)
    accs, sums = [], []
    for start in range(0, context_len, split_tokens):
        chunk = slice(start, min(start + split_tokens, context_len))
        accs.append(torch.einsum("hs,shd->hd", p[:, chunk], values[chunk]))
        sums.append(p[:, chunk].sum(1))
    return torch.stack(accs, 1), torch.stack(sums, 1)


def test_unified_max_partials_match_torch_math():
    context_lens = [100, 20]
    k_cache, v_cache = random_cache(16, 16, 2, torch.float32)
    tables = shuffled_tables(context_lens, 16, 16, seed=4)
    q = torch.randn(2, 6, HEAD_DIM, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    lens = torch.tensor(context_lens, device=DEVICE)
    phi = 1.5
    partials = decode_split_partials(
        q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, split_tokens=32, softmax_offset=phi
    )
    assert partials.acc.shape == (2, 6, 4, HEAD_DIM)  # 7 blocks of 16 -> 4 chunks of 32
    for b, context_len in enumerate(context_lens):
        used = math.ceil(context_len / 32)
        acc, sums = torch_unified_partials(q[b], k_cache, v_cache, tables[b], context_len, 32, phi)
        torch.testing.assert_close(partials.acc[b, :, :used], acc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(partials.sums[b, :, :used], sums, atol=1e-5, rtol=1e-5)
        assert torch.all(partials.maxima[b, :, :used] == torch.tensor(phi * LOG2E))
        assert torch.all(partials.maxima[b, :, used:] == float("-inf"))
        assert torch.all(partials.sums[b, :, used:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("query_scale,softmax_offset", [(1.0, 0.0), (100.0, 0.0), (1.0, 100.0)])
def test_unified_max_fallback(dtype, query_scale, softmax_offset):
    """Normal scores keep the unified max; scores far above phi (huge queries) or far below
    it (phi = 100) fall back to the running max. The result equals the reference either way."""
    context_lens = [90, 64]  # every chunk holds >= 26 keys, so some score leaves the window
    k_cache, v_cache = random_cache(16, 16, 2, dtype, seed=5)
    tables = shuffled_tables(context_lens, 16, 16, seed=5)
    q = torch.randn(2, 4, HEAD_DIM, generator=torch.Generator().manual_seed(5))
    q = (q * query_scale).to(dtype).to(DEVICE)
    lens = torch.tensor(context_lens, device=DEVICE)
    args = (q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, 32, softmax_offset)
    maxima = decode_split_partials(*args).maxima
    used = torch.arange(maxima.shape[2], device=DEVICE) < torch.ceil(lens / 32)[:, None]
    unified = maxima == torch.tensor(softmax_offset * LOG2E, dtype=torch.float32)
    if query_scale == 1.0 and softmax_offset == 0.0:
        assert torch.all(unified.permute(1, 0, 2)[:, used])
    else:
        assert torch.all(~unified.permute(1, 0, 2)[:, used])
    out = paged_decode_attention(*args)
    expected = reference_decode(q, k_cache, v_cache, tables, context_lens, HEAD_DIM**-0.5)
    # fp32 logits near 300 carry absolute rounding errors near 1e-5.
    huge = dtype == torch.float32 and query_scale > 1.0
    tolerance = dict(atol=1e-4, rtol=1e-4) if huge else TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_is_batch_invariant(dtype):
    """A sequence's result is bitwise the same alone and beside much longer sequences (whose
    wider block table means more chunks in the grid)."""
    context_lens = [45, 300, 3]
    k_cache, v_cache = random_cache(32, 16, 2, dtype, seed=6)
    tables = shuffled_tables(context_lens, 16, 32, seed=6)
    q = torch.randn(3, 6, HEAD_DIM, generator=torch.Generator().manual_seed(6))
    q = q.to(dtype).to(DEVICE)
    batched = run_decode(q, k_cache, v_cache, tables, context_lens, split_tokens=32)
    for b, context_len in enumerate(context_lens):
        width = math.ceil(context_len / 16)
        own_table = tables[b : b + 1, :width]
        alone = run_decode(
            q[b : b + 1], k_cache, v_cache, own_table, [context_len], split_tokens=32
        )
        assert torch.equal(alone[0], batched[b])


def test_split_size_must_be_a_multiple_of_16():
    k_cache, v_cache = random_cache(4, 16, 1, torch.float32)
    tables = shuffled_tables([20], 16, 4)
    q = torch.zeros(1, 1, HEAD_DIM, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        run_decode(q, k_cache, v_cache, tables, [20], split_tokens=40)


def prefill_reference(q, k_cache, v_cache, tables, starts, lens, context_lens, scale):
    """torch_paged.gather_kv + prefill_attention per sequence, in fp32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=DEVICE)
    for s, (start, n, context_len) in enumerate(zip(starts, lens, context_lens)):
        keys = torch_paged.gather_kv(k_cache, tables[s], context_len).float()
        values = torch_paged.gather_kv(v_cache, tables[s], context_len).float()
        rows = slice(start, start + n)
        out[rows] = torch_paged.prefill_attention(q[rows].float(), keys, values, scale)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (3, 3), (1, 4)])
def test_prefill_matches_reference(dtype, num_kv_heads, group):
    """Whole prompts, chunked prefill (query_len < context_len), one-query chunks, and
    chunks longer than one program's tile of queries."""
    context_lens = [37, 90, 5, 81]
    query_lens = [37, 24, 1, 70]
    starts = [0, 37, 61, 62]
    k_cache, v_cache = random_cache(24, 16, num_kv_heads, dtype, seed=7)
    tables = shuffled_tables(context_lens, 16, 24, seed=7)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sum(query_lens), num_kv_heads * group, HEAD_DIM, generator=gen)
    q = q.to(dtype).to(DEVICE)
    layout = [torch.tensor(x, device=DEVICE) for x in (starts, query_lens, context_lens)]
    out = paged_prefill_attention(q, k_cache, v_cache, tables, *layout, HEAD_DIM**-0.5)
    expected = prefill_reference(
        q, k_cache, v_cache, tables, starts, query_lens, context_lens, HEAD_DIM**-0.5
    )
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


def mixed_step(block_size: int = 16) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Two decodes then a whole prompt and a chunked prefill: metadata, new k and v."""
    context_lens, query_lens = [40, 7, 20, 70], [1, 1, 20, 30]
    tables = shuffled_tables(context_lens, block_size, 16, seed=8)
    starts = [0, 1, 2, 22]
    slots = []
    for s, (context_len, n) in enumerate(zip(context_lens, query_lens)):
        for pos in range(context_len - n, context_len):
            slots.append(int(tables[s, pos // block_size]) * block_size + pos % block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=tables,
        context_lens=torch.tensor(context_lens, device=DEVICE),
        context_lens_list=context_lens,
        query_lens_list=query_lens,
        query_starts_list=starts,
        num_decodes=2,
        block_size=block_size,
    )
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(len(slots), 3, HEAD_DIM, generator=gen).to(DEVICE)
    v = torch.randn(len(slots), 3, HEAD_DIM, generator=gen).to(DEVICE)
    return meta, k, v


def backend_step(backend_module, meta, k, v, q, capture):
    k_cache, v_cache = random_cache(16, 16, 3, torch.float32, seed=9)
    meta.capture = capture
    backend_module.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = backend_module.paged_attention(q, k_cache, v_cache, meta, HEAD_DIM**-0.5)
    return out, k_cache


@pytest.mark.parametrize("with_capture", [False, True])
def test_triton_backend_matches_torch_backend(with_capture):
    """Mixed decode + prefill step; with a capture, one decode and one prefill also record
    column sums (through the torch functions) exactly as the torch backend does."""
    meta, k, v = mixed_step()
    q = torch.randn(52, 9, HEAD_DIM, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    captures = [
        AttentionCapture({}, {0, 3}, {3: 50}, exclude_self=True) if with_capture else None
        for _ in range(2)
    ]
    expected, expected_cache = backend_step(torch_paged, meta, k, v, q, captures[0])
    out, cache = backend_step(triton_paged, meta, k, v, q, captures[1])
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    if with_capture:
        for i in (0, 3):
            torch.testing.assert_close(
                captures[1].column_sums(i), captures[0].column_sums(i), atol=1e-6, rtol=1e-6
            )


def test_select_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend("torch", cuda) is TORCH_BACKEND
    assert select_backend("auto", cpu) is TORCH_BACKEND
    assert select_backend("auto", cuda).name == "triton"
    if triton_paged.kernels_interpreted():  # allowed on the CPU: the kernels are interpreted
        triton_backend = select_backend("triton", cpu)
        assert triton_backend.paged_attention is triton_paged.paged_attention
    with pytest.raises(ValueError, match="unknown value 'flash'"):
        select_backend("flash", cpu)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="flash")
    monkeypatch.setattr(triton_paged, "kernels_interpreted", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("triton", cpu)
    # As if triton were missing: the backend module cannot be imported.
    monkeypatch.delattr(thinfer.attention, "triton_paged")
    monkeypatch.setitem(sys.modules, "thinfer.attention.triton_paged", None)
    with pytest.raises(ValueError, match="needs triton, which cannot be imported"):
        select_backend("triton", cuda)
    assert select_backend("auto", cuda) is TORCH_BACKEND


def test_cli_attention_backend_flag():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert llm_kwargs(parser.parse_args([]))["attention_backend"] == "auto"
    args = parser.parse_args(["--attention-backend", "triton"])
    assert llm_kwargs(args)["attention_backend"] == "triton"
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "flash"])


def test_smollm2_greedy_tokens_same_with_triton_backend(llm):
    """The real model through the Triton kernels (interpreted on CPU) picks the same greedy
    tokens as with the torch backend: a 6-token prompt, 4 new tokens."""
    from thinfer import LLM

    prompt = llm.tokenizer.encode("The capital of France is")[:6]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    expected = llm.generate(prompt, params)[0].outputs[0].token_ids
    started = time.perf_counter()
    triton_llm = LLM(
        dtype="float32", device=str(DEVICE), num_kv_blocks=64, attention_backend="triton"
    )
    layer = triton_llm.engine.model.layers[0].self_attn
    assert layer.backend.name == "triton"
    tokens = triton_llm.generate(prompt, params)[0].outputs[0].token_ids
    print(f"triton backend: load + 4 tokens in {time.perf_counter() - started:.1f} s")
    assert tokens == expected


# ----- GPU, real shapes (Llama-2-7B: 32 heads / 32 KV heads, head_dim 128, block 16) -----


def gpu_case(context_lens, num_heads=32, num_kv_heads=32, dtype=torch.bfloat16, seed=0):
    block_size, head_dim = 16, 128
    num_blocks = sum(math.ceil(c / block_size) for c in context_lens) + 8
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    tables = shuffled_tables(context_lens, block_size, num_blocks, seed)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen, device="cuda")
    return q.to(dtype), k_cache, v_cache, tables, head_dim**-0.5


@needs_cuda
@pytest.mark.parametrize("num_kv_heads", [32, 8])
def test_gpu_decode_llama2_shapes(num_kv_heads):
    context_lens = [1024, 8192, 3001, 4096, 17, 5555, 2048, 7000]
    q, k_cache, v_cache, tables, scale = gpu_case(context_lens, num_kv_heads=num_kv_heads)
    lens = torch.tensor(context_lens, device="cuda")
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    expected = reference_decode(q, k_cache, v_cache, tables, context_lens, scale)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[torch.bfloat16])
    # Batch invariance: the 17-token sequence alone (a 2-block table: one chunk, not 16).
    alone = paged_decode_attention(q[4:5], k_cache, v_cache, tables[4:5, :2], lens[4:5], scale)
    assert torch.equal(alone[0], out[4])


@needs_cuda
@pytest.mark.parametrize("query_scale", [1.0, 40.0])
def test_gpu_decode_fallback_llama2_shapes(query_scale):
    context_lens = [4096, 1500]
    q, k_cache, v_cache, tables, scale = gpu_case(context_lens, seed=1)
    q = (q.float() * query_scale).to(torch.bfloat16)
    lens = torch.tensor(context_lens, device="cuda")
    maxima = decode_split_partials(q, k_cache, v_cache, tables, lens, scale).maxima
    both = range(-(-min(context_lens) // DECODE_SPLIT_TOKENS))  # chunks with both sequences' keys
    used = maxima[:, :, list(both)]
    assert torch.all((used == 0) if query_scale == 1.0 else (used != 0))
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    expected = reference_decode(q, k_cache, v_cache, tables, context_lens, scale)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[torch.bfloat16])


@needs_cuda
def test_gpu_prefill_and_store_llama2_shapes():
    context_lens, query_lens = [1024, 4096, 2500], [1024, 512, 2000]
    q, k_cache, v_cache, tables, scale = gpu_case(context_lens, seed=2)
    starts = [0, 1024, 1536]
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(sum(query_lens), 32, 128, generator=gen, device="cuda").bfloat16()
    layout = [torch.tensor(x, device="cuda") for x in (starts, query_lens, context_lens)]
    out = paged_prefill_attention(q, k_cache, v_cache, tables, *layout, scale)
    expected = prefill_reference(
        q, k_cache, v_cache, tables, starts, query_lens, context_lens, scale
    )
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[torch.bfloat16])
    k = torch.randn(300, 32, 128, generator=gen, device="cuda").bfloat16()
    slots = torch.randperm(k_cache.shape[0] * 16, device="cuda")[:300]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_paged.store_kv(k, -k, expected_k, expected_v, slots)
    store_kv(k, -k, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
