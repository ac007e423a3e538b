"""Static, padded decode steps (thinfer.engine.decode_graphs) and their CUDA-graph replay.

On CPU the static-buffer path runs eagerly ("padded static decode": the same buffers,
buckets, padding rows and metadata a graph replays, only not captured), with SmolLM2 through
the Triton kernels in the interpreter, and is compared with the ordinary eager step. Graph
capture and replay at GPU shapes (bf16, fp16) are tested with CUDA only.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import with_engine
from default_model import require_default_model
from test_fused_model import HALF_LOGITS_REL, assert_rows_close, record_logits

from thinfer import LLM, SamplingParams
from thinfer.cli_args import add_model_args, llm_kwargs
from thinfer.compression import CompressionConfig
from thinfer.config import EngineConfig
from thinfer.engine.decode_graphs import DecodeGraphs, cuda_graphs_apply, decode_buckets
from thinfer.engine.scheduler import ScheduledSequence
from thinfer.engine.sequence import Sequence

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def triton_llm() -> LLM:
    """SmolLM2 in fp32 with the triton backend; a short context keeps the static block
    tables (and the interpreted decode grid) small."""
    require_default_model()
    return LLM(
        dtype="float32",
        device=str(DEVICE),
        num_kv_blocks=64,
        max_model_len=512,
        max_num_seqs=MAX_NUM_SEQS,
        attention_backend="triton",
        cuda_graphs=False,
    )


def static_engine(llm: LLM, num_kv_blocks: int = 64) -> LLM:
    """A fresh engine on `llm`'s weights whose plain decode steps take the static path,
    eagerly (no capture)."""
    clone = with_engine(llm, num_kv_blocks, max_num_seqs=MAX_NUM_SEQS, cuda_graphs=False)
    engine = clone.engine
    engine.runner.decode_graphs = DecodeGraphs(
        engine.model, engine.kv_cache, MAX_NUM_SEQS, llm.max_model_len, use_cuda_graphs=False
    )
    return clone


def decode_item(prompt_len: int = 3, seq_id: int = 0) -> ScheduledSequence:
    """A sequence whose next step decodes its one sampled token."""
    seq = Sequence(seq_id, str(seq_id), 0, list(range(1, prompt_len + 1)), SamplingParams(), None)
    seq.output_token_ids = [7]
    seq.num_computed_tokens = seq.kv_len = prompt_len
    seq.block_table = [1]
    return ScheduledSequence(seq, 1)


def test_decode_buckets():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(1) == [1]
    with pytest.raises(ValueError):
        decode_buckets(0)


@pytest.mark.parametrize("batch_size, bucket", [(1, 1), (3, 4)])
def test_padded_static_decode_matches_eager_step(triton_llm, english_prompts, batch_size, bucket):
    """Prefill (eager), then two decode steps padded to `bucket` on the static buffers:
    the same greedy tokens as ordinary eager steps, logits within fp32 tolerance, and the
    padded row's KV lands only in the scratch block."""
    prompts = [triton_llm.tokenizer.encode(p)[:6] for p in english_prompts[:batch_size]]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    eager = with_engine(triton_llm, 64, max_num_seqs=MAX_NUM_SEQS)
    static = static_engine(triton_llm)
    graphs = static.engine.runner.decode_graphs
    expected_logits, logits = record_logits(eager), record_logits(static)
    expected = [out.outputs[0].token_ids for out in eager.generate(prompts, params)]
    tokens = [out.outputs[0].token_ids for out in static.generate(prompts, params)]
    assert tokens == expected
    assert graphs.bucket_steps == {bucket: 2}  # the prefill step ran eagerly
    assert len(logits) == len(expected_logits) == 3
    for step, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-4)
    # The scratch block is held for good; every sequence's blocks came back.
    kv = static.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks - 1
    scratch = kv.storage[:, :, graphs.scratch_block]
    if bucket > batch_size:
        assert scratch[:, :, 0].abs().sum() > 0 and not scratch[:, :, 1:].any()
    else:
        assert not scratch.any()


def test_plain_decodes_take_the_static_path_and_others_fall_back(triton_llm):
    core = static_engine(triton_llm).engine
    runner = core.runner
    decodes = [decode_item(3, i) for i in range(3)]
    assert runner.runs_static(decodes)
    prefill = ScheduledSequence(Sequence(9, "9", 0, [1, 2, 3], SamplingParams(), None), 3)
    assert not runner.runs_static([prefill])
    assert not runner.runs_static(decodes + [prefill])  # mixed
    captured = decode_item(3, 10)
    core.compression.attach(captured.seq, CompressionConfig("h2o", budget=24, window=4))
    assert not runner.runs_static(decodes + [captured])  # wants column sums: meta.capture
    too_many = [decode_item(3, i) for i in range(MAX_NUM_SEQS + 1)]
    assert not runner.runs_static(too_many)
    wide = decode_item(3, 11)
    wide.seq.block_table = [1] * (runner.decode_graphs.max_blocks_per_seq + 1)
    assert not runner.runs_static([wide])
    runner.decode_graphs = None
    assert not runner.runs_static(decodes)


def test_scratch_block_is_not_offered_to_requests(triton_llm):
    """Validation counts only the blocks sequences can get (7 of 8 here)."""
    engine = static_engine(triton_llm, num_kv_blocks=8).engine
    assert engine.kv_cache.capacity_tokens == 7 * 16
    assert engine.kv_cache.num_used_blocks == 0  # the reserved block is nobody's
    prompt = list(range(1, 11))
    engine.validate(len(prompt), SamplingParams(max_tokens=102))  # 112 = 7 blocks of 16
    with pytest.raises(ValueError, match="can never fit in the KV cache"):
        engine.validate(len(prompt), SamplingParams(max_tokens=103))


def test_where_cuda_graphs_apply(llm, triton_llm):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fused = triton_llm.engine.model
    assert cuda_graphs_apply(EngineConfig(), fused, cuda)
    assert not cuda_graphs_apply(EngineConfig(cuda_graphs=False), fused, cuda)
    assert not cuda_graphs_apply(EngineConfig(), fused, cpu)
    assert not cuda_graphs_apply(EngineConfig(), llm.engine.model, cuda)  # torch backend
    assert llm.engine.runner.decode_graphs is None
    assert triton_llm.engine.runner.decode_graphs is None  # built with cuda_graphs=False
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        EngineConfig(cuda_graphs="yes")  # type: ignore[arg-type]
    kv = triton_llm.engine.kv_cache
    with pytest.raises(ValueError, match="triton attention backend"):
        DecodeGraphs(llm.engine.model, kv, 4, 512, use_cuda_graphs=False)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            DecodeGraphs(fused, kv, 4, 512, use_cuda_graphs=True)


def test_cli_cuda_graphs_flag():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert llm_kwargs(parser.parse_args([]))["cuda_graphs"] is True
    assert llm_kwargs(parser.parse_args(["--no-cuda-graphs"]))["cuda_graphs"] is False
    assert llm_kwargs(parser.parse_args(["--cuda-graphs"]))["cuda_graphs"] is True


# ----- GPU: capture and replay ----------------------------------------------------------


def graph_vs_eager(model: str, dtype: str, max_model_len: int) -> None:
    """Five requests forced through the same tokens with and without CUDA graphs; they
    finish at different steps, so decode batches of 5, 3 and 1 use buckets 8, 4 and 1."""
    graphed = LLM(
        model=model,
        load_format="dummy",
        dtype=dtype,
        device="cuda",
        num_kv_blocks=256,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=max_model_len,
        attention_backend="triton",
        cuda_graphs=True,
    )
    eager = with_engine(graphed, 256, max_num_seqs=MAX_NUM_SEQS, cuda_graphs=False)
    graphs = graphed.engine.runner.decode_graphs
    assert graphs is not None and graphs.use_cuda_graphs
    assert eager.engine.runner.decode_graphs is None
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 40, 17, 100, 3)]
    forced = torch.randint(3, 500, (6,), generator=gen).tolist()
    params = [
        SamplingParams(max_tokens=n, forced_tokens=forced[:n], ignore_eos=True)
        for n in (6, 4, 4, 2, 2)
    ]
    expected_logits, logits = record_logits(eager), record_logits(graphed)
    eager.generate(prompts, params)
    graphed.generate(prompts, params)
    assert graphs.captured_buckets == [1, 4, 8]
    assert graphs.bucket_steps == {8: 1, 4: 2, 1: 2}
    assert len(logits) == len(expected_logits) == 6
    for step, want in zip(logits, expected_logits, strict=True):
        assert_rows_close(step, want, HALF_LOGITS_REL[dtype])
    kv = graphed.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks - 1


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_cuda_graph_replay_matches_eager_tiny(dtype):
    graph_vs_eager("tiny", dtype, max_model_len=2048)


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_cuda_graph_replay_matches_eager_llama2_7b(dtype):
    """Llama-2-7B shapes (32 layers, 32 heads, head_dim 128, block 16), full 4K context:
    block tables 256 wide, 8 decode chunks per sequence."""
    graph_vs_eager("llama-2-7b", dtype, max_model_len=4096)
