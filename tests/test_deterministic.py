"""The deterministic mode: a request's token ids and logprobs are bitwise the same alone or in
any batch (other prompts, `max_num_seqs`, token budgets that chunk its prefill differently,
preemption), under every compression method; the default mode is not (negative control).
Real model (SmolLM2-135M GGUF), real tokenizer, CPU."""

from __future__ import annotations

import pytest
import torch
from compression_utils import MAX_TOKENS, combos, config_for, write_random_predictor
from conftest import run_cli, with_engine

from thinfer import LLM, SamplingParams
from thinfer.attention import native_invariant
from thinfer.attention.invariant_paged import (
    FIXED_POINT_BITS,
    KEY_SPLIT,
    attend,
    attend_chunk,
    gather_padded,
)
from thinfer.attention.metadata import AttentionMetadata
from thinfer.attention.torch_paged import prefill_attention
from thinfer.cli import build_parser
from thinfer.cli_args import llm_kwargs
from thinfer.config import EngineConfig
from thinfer.engine.deterministic import check_deterministic_config
from thinfer.kernels.cpu_native import native_library
from thinfer.kernels.cpu_panels import panels_available
from thinfer.models.invariant_linear import ANY_ROWS
from thinfer.models.invariant_ops import INVARIANT_OPS
from thinfer.models.linear import pack_linears

OTHERS = [
    "Write a haiku about the autumn wind and the falling leaves.",
    "2 + 2 =",
    "The three laws of thermodynamics state that energy",
    "def fibonacci(n):",
    "In 1492,",
]


def params(
    seed: int, kv_compression: dict | None = None, max_tokens: int = MAX_TOKENS
) -> SamplingParams:
    """Seeded sampling (the per-request generator is exercised) with top-2 logprobs."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=seed,
        logprobs=2,
        ignore_eos=True,
        kv_compression=kv_compression,
    )


def outputs(llm: LLM, prompts: list[str], sampling: list[SamplingParams]) -> list[tuple]:
    """(token ids, logprobs) per prompt, in prompt order."""
    done = llm.generate(prompts, sampling)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in done]


@pytest.fixture(scope="module")
def restore_default(llm):
    """Deterministic engines switch the shared model's kernels; give them back after."""
    yield
    with_engine(llm, num_kv_blocks=16)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, llm) -> str:
    return write_random_predictor(tmp_path_factory.mktemp("deterministic"), llm)


@pytest.mark.parametrize("fused_ops", ["auto", False])
def test_one_request_alone_equals_it_in_every_batch(
    llm, english_prompts, restore_default, fused_ops
):
    """Alone; beside five others in a roomy engine; beside three others with at most three
    sequences, a 7-token step budget (its prefill in chunks) and a pool so small that
    sequences are swapped out: the same ids and logprobs, bitwise. `fused_ops` "auto": the
    native row-wise kernels (where they load), whose plain decode steps take the native
    decoder stack and give the per-layer path's bits; False: the torch path."""
    target, target_params = english_prompts[1], params(seed=7, max_tokens=24)
    alone = with_engine(llm, num_kv_blocks=512, deterministic=True, fused_ops=fused_ops)
    expected = outputs(alone, [target], [target_params])[0]
    native = alone.engine.model.layers[0].self_attn.backend.name == "invariant-native"
    assert native == (fused_ops == "auto" and native_library() is not None)
    if native and panels_available():  # decode steps in one native call, the same bits
        assert alone.engine.model.native_stack is not None
        alone.engine.model.set_native_decoder(False)
        assert outputs(alone, [target], [target_params])[0] == expected
    settings = [
        (5, {"num_kv_blocks": 512}),
        (3, {"num_kv_blocks": 10, "block_size": 8, "max_num_seqs": 3, "max_num_batched_tokens": 7}),
    ]
    for others, config in settings:
        engine = with_engine(llm, deterministic=True, fused_ops=fused_ops, **config)
        position = others // 2
        prompts = OTHERS[:position] + [target] + OTHERS[position:others]
        sampling = [params(seed=100 + i, max_tokens=24) for i in range(len(prompts))]
        sampling[position] = target_params
        assert outputs(engine, prompts, sampling)[position] == expected, config
        assert engine.engine.num_preemptions > 0 or config["num_kv_blocks"] == 512


def test_default_mode_is_not_batch_invariant(llm, english_prompts, restore_default, monkeypatch):
    """Negative control: the same comparison without the mode changes logprobs where the
    products run oneDNN/MKL (as on a CPU without the AVX-512 build: they take other kernels
    for a few rows than for many), and the mode on those same products does not. On this
    machine's native fp32 panels and native attention the default happens to give the same
    bits here too (each row computed on its own), which nothing guarantees; see
    docs/determinism.md."""
    target = english_prompts[1]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2, ignore_eos=True)
    tight = {"num_kv_blocks": 512, "max_num_seqs": 3, "max_num_batched_tokens": 7}
    monkeypatch.setattr("thinfer.models.linear.panels_available", lambda: False)
    pack_linears(llm.loaded.net)  # oneDNN's packed weights instead of the panels
    try:
        for deterministic in (False, True):
            roomy = with_engine(llm, num_kv_blocks=512, deterministic=deterministic)
            alone = outputs(roomy, [target], [greedy])[0]
            engine = with_engine(llm, deterministic=deterministic, **tight)
            mixed = outputs(engine, [OTHERS[0], target, OTHERS[1]], [greedy] * 3)[1]
            assert (alone[1] == mixed[1]) == deterministic
            tiles = engine.engine.model.layers[0].mlp.down_proj.invariant_tiles
            assert tiles is None if not deterministic else tiles != (ANY_ROWS,)
    finally:
        monkeypatch.undo()
        pack_linears(llm.loaded.net)


def deterministic_combos() -> list[tuple[str, str, str]]:
    """Every method with its native trigger (per-head scoring where it has it), and the
    uniform trigger with each scoring mode (the full cross product runs in the contract
    test; here each run costs more)."""
    every = combos()
    native = [
        c
        for c in every
        if c[1] == "native" and (c[2] == "per_head" or (c[0], "native", "per_head") not in every)
    ]
    uniform = [
        ("h2o", "uniform", "shared"),
        ("rkv", "uniform", "per_head"),
        ("dynts", "uniform", "shared"),
    ]
    return native + uniform


def test_every_compression_method_is_deterministic(
    llm, english_prompts, predictor, restore_default
):
    """Every method (see `deterministic_combos`): the same requests in two different batches
    (order, chunking, swapping) give bitwise the same ids and logprobs, and two of them equal
    their request run alone."""
    configs = [None] + [config_for(*case, predictor) for case in deterministic_combos()]
    prompts = [english_prompts[i % 5] for i in range(len(configs))]
    sampling = [params(seed=i, kv_compression=c, max_tokens=32) for i, c in enumerate(configs)]
    roomy = with_engine(llm, num_kv_blocks=512, block_size=8, deterministic=True)
    first = outputs(roomy, prompts, sampling)
    tight = with_engine(
        llm,
        num_kv_blocks=16,
        block_size=8,
        max_num_seqs=5,
        max_num_batched_tokens=11,
        deterministic=True,
    )
    second = outputs(tight, prompts[::-1], sampling[::-1])[::-1]
    assert tight.engine.num_preemptions > 0
    for config, a, b in zip(configs, first, second, strict=True):
        assert a == b, config
    h2o = configs.index(config_for("h2o", "native", "per_head", predictor))
    dynts = configs.index(config_for("dynts", "uniform", "shared", predictor))
    for index in (h2o, dynts):
        alone = with_engine(llm, num_kv_blocks=512, block_size=8, deterministic=True)
        assert outputs(alone, [prompts[index]], [sampling[index]])[0] == first[index]


@pytest.mark.parametrize("through_triton", [False, True])
def test_attention_rows_do_not_depend_on_chunks_or_decode(through_triton, monkeypatch):
    """A prefill in one call, in chunks, or row by row as decodes (alone or batched with other
    sequences' decodes) gives each row the same bits, close to SDPA; fixed-point column sums
    add up exactly in any split. `through_triton`: the CUDA path (every head in one Triton
    product), interpreted on the CPU."""
    if through_triton:
        pytest.importorskip("thinfer.kernels.invariant_matmul")
        monkeypatch.setattr("thinfer.kernels.placement.TRITON_ON_CPU", True)
    torch.manual_seed(0)
    context, block = 296, 8
    cache_k = torch.randn(context // block, block, 3, 64)
    cache_v = torch.randn(context // block, block, 3, 64)
    table = torch.arange(context // block)[None]
    queries = torch.randn(context, 9, 64)

    def chunk(rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = gather_padded(cache_k, table, [length])
        values = gather_padded(cache_v, table, [length])
        return attend_chunk(queries[rows], keys, values, length, 0.125, first_counted_slot=0)

    whole, sums = chunk(slice(None), context)
    dense_k, dense_v = cache_k.view(context, 3, 64), cache_v.view(context, 3, 64)
    torch.testing.assert_close(whole, prefill_attention(queries, dense_k, dense_v, 0.125))
    split = KEY_SPLIT
    for cut in (1, split - 1, split, split + 1, 2 * split + 1, context - 1):
        head, head_sums = chunk(slice(None, cut), cut)
        tail, tail_sums = chunk(slice(cut, None), context)
        assert torch.equal(torch.cat([head, tail]), whole)
        added = tail_sums.clone()
        added[:, :cut] += head_sums
        assert torch.equal(added, sums)
    lengths = [1, split - 1, split, split + 1, context, 200]
    keys = gather_padded(cache_k, table.expand(6, -1), lengths)
    values = gather_padded(cache_v, table.expand(6, -1), lengths)
    rows = torch.tensor(lengths) - 1
    decodes, _ = attend(queries[rows], keys, values, torch.tensor(lengths), 0.125)
    for index, length in enumerate(lengths):
        alone, _ = chunk(slice(length - 1, length), length)
        assert torch.equal(alone[0], whole[length - 1])
        assert torch.equal(decodes[index], whole[length - 1])
    total = float(sums.sum()) / 2**FIXED_POINT_BITS
    assert total == pytest.approx(context * 9, abs=1e-3)  # each query head spreads mass 1


def _step(decode_lens: list[int], chunks: list[tuple[int, int]], block: int) -> AttentionMetadata:
    """Metadata of a step over sequences that all share one block table: decodes at
    `decode_lens`, then prefill chunks (rows, context)."""
    query_lens = [1] * len(decode_lens) + [rows for rows, _ in chunks]
    contexts = decode_lens + [context for _, context in chunks]
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    table = torch.arange(64)[None].expand(len(contexts), -1)
    return AttentionMetadata(
        torch.zeros(sum(query_lens), dtype=torch.int64), table.contiguous(),
        torch.tensor(contexts), contexts, query_lens, starts, len(decode_lens), block,
    )  # fmt: skip


@pytest.mark.skipif(native_library() is None, reason="native CPU kernels")
def test_native_attention_rows_do_not_depend_on_chunks_or_decode():
    """The mode's native attention: a prefill in one step, in chunks beside decodes, or row
    by row as decodes gives each row the same bits, close to SDPA."""
    torch.manual_seed(0)
    context, block = 150, 8
    cache_k, cache_v = (torch.randn(64, block, 3, 64) for _ in "kv")
    queries = torch.randn(context, 9, 64)
    whole = native_invariant.paged_attention(
        queries, cache_k, cache_v, _step([], [(context, context)], block), 0.125
    )
    dense_k, dense_v = (c.view(-1, 3, 64)[:context] for c in (cache_k, cache_v))
    torch.testing.assert_close(whole, prefill_attention(queries, dense_k, dense_v, 0.125))
    decodes = [1, 17, 128, context]
    rows = torch.tensor(decodes) - 1
    mixed = torch.cat([queries[rows], queries[40:90]])
    step = _step(decodes, [(50, 90)], block)
    out = native_invariant.paged_attention(mixed, cache_k, cache_v, step, 0.125)
    assert torch.equal(out[: len(decodes)], whole[rows])
    assert torch.equal(out[len(decodes) :], whole[40:90])


def test_invariant_silu_is_pointwise():
    torch.manual_seed(0)
    gate_up = torch.randn(333, 2 * 1536) * 3
    rows = torch.cat([INVARIANT_OPS.silu_mul(gate_up[i : i + 1]) for i in range(333)])
    assert torch.equal(INVARIANT_OPS.silu_mul(gate_up), rows)
    gate, up = gate_up.split(1536, dim=-1)
    torch.testing.assert_close(rows, torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"attention_backend": "triton"}, "attention_backend='triton'"),
        ({"fused_ops": True}, "fused_ops=True"),
        ({"gemm_dataflow": "table.json"}, "gemm_dataflow"),
    ],
)
def test_conflicting_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        check_deterministic_config(EngineConfig(deterministic=True, **settings))


def test_quantization_is_refused(llm):
    with pytest.raises(ValueError, match="quantization='int4' has no batch-invariant kernel"):
        LLM(llm.loaded, deterministic=True, quantization="int4")
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        EngineConfig(deterministic="yes")  # type: ignore[arg-type]


def test_generate_and_serve_take_the_flag(llm, restore_default):
    """`thinfer generate --deterministic` runs the mode end to end (same greedy text as the
    default here); `thinfer serve --deterministic` hands it to the LLM it builds."""
    result = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--deterministic")
    assert result.returncode == 0, result.stderr
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    default = with_engine(llm, num_kv_blocks=64)  # the default kernels, in this process
    expected = default.generate("The capital of France is", greedy)[0].outputs[0].text
    assert result.stdout == expected + "\n"
    args = build_parser().parse_args(["serve", "--deterministic"])
    assert llm_kwargs(args)["deterministic"] is True
    assert llm_kwargs(build_parser().parse_args(["serve"]))["deterministic"] is False
