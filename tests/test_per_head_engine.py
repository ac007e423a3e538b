"""H2O, SnapKV and R-KV inside the engine: signals equal HF's explicit attention, KV bounds,
block reuse, and full-cache tokens when the budget is never reached."""

from __future__ import annotations

import pytest
import torch
from conftest import with_engine

from thinfer import SamplingParams
from thinfer.compression import CompressionConfig
from thinfer.compression.compaction import plan_compaction
from thinfer.compression.selection import SequenceView, select_slots


def test_h2o_accumulated_attention_equals_hf_eager(llm, hf_model, english_prompts):
    """The column sums taken from thinfer's own attention (chunked prefill, then decode)
    equal the column sums of HF's explicit attention matrices over the same tokens."""
    engine = with_engine(llm, max_num_batched_tokens=16)  # the prompt prefills in chunks
    core = engine.engine
    ids = llm.tokenizer.encode(english_prompts[5])
    params = SamplingParams(
        max_tokens=50,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "h2o", "budget": 400},
    )
    core.add_request(ids, params)
    while not core.scheduler.running or len(core.scheduler.running[0].output_token_ids) < 6:
        core.step()
    seq = core.scheduler.running[0]
    fed = seq.all_token_ids[: seq.num_computed_tokens]
    hf_model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = hf_model(torch.tensor([fed]), output_attentions=True).attentions
    finally:
        hf_model.set_attn_implementation("sdpa")
    cfg = llm.model_config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    expected = torch.stack([a[0].sum(1) for a in attentions])  # [L, Hq, T] column sums
    expected = expected.view(cfg.num_hidden_layers, cfg.num_key_value_heads, group, -1).sum(2)
    received = seq.compression.state.value("attention")  # nothing evicted: slot = position
    assert received.shape == expected.shape
    torch.testing.assert_close(received, expected, atol=2e-4, rtol=1e-4)
    core.abort_request(seq.request_id)


@pytest.mark.parametrize(
    "config",
    [
        {"method": "h2o", "budget": 20},
        {"method": "snapkv", "budget": 20, "interval": 16},
        {"method": "rkv", "budget": 24, "interval": 8, "observation_window": 4},
        {"method": "rkv", "budget": 30, "window": 6, "trigger": "uniform"},
    ],
)
def test_kv_stays_within_the_method_bound_and_blocks_are_reused(llm, english_prompts, config):
    engine = with_engine(llm, num_kv_blocks=64, block_size=8)
    core = engine.engine
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, kv_compression=config)
    budget = config["budget"]
    native_periodic = config["method"] != "h2o" and config.get("trigger") != "uniform"
    bound = budget + config.get("interval", 0) - 1 if native_periodic else budget
    for prompt in english_prompts[:4]:
        core.add_request(prompt, params)
    peak = 0
    while core.has_unfinished_requests():
        core.step()
        for seq in core.scheduler.running:
            assert seq.kv_len <= max(len(seq.prompt_token_ids), budget) + bound - budget
            assert len(seq.block_table) == core.kv_cache.blocks_for(seq.kv_len)
            peak = max(peak, seq.kv_len)
    assert peak > budget - 2  # the bound was actually approached
    assert core.kv_cache.num_free_blocks == 64  # no leaks


@pytest.mark.parametrize("method", ["h2o", "snapkv", "rkv"])
def test_budget_beyond_the_sequence_changes_nothing(llm, english_prompts, method):
    full = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = SamplingParams(
        max_tokens=20,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": method, "budget": 500}
        | ({} if method == "h2o" else {"interval": 4}),
    )
    prompts = english_prompts[:3]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, full)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, roomy)] == expected


def test_per_head_methods_evict_different_tokens_per_head(llm, english_prompts):
    core = with_engine(llm).engine
    roomy = {"method": "h2o", "budget": 500}
    params = SamplingParams(max_tokens=40, temperature=0.0, kv_compression=roomy)
    core.add_request(english_prompts[5], params)
    core.step()  # prefill: attention accumulated over the whole prompt
    seq = core.scheduler.running[0]
    tight = CompressionConfig("h2o", budget=24, window=4)
    view = SequenceView(seq.kv_len, 1, len(seq.prompt_token_ids), lambda: seq.all_token_ids)
    chosen = select_slots(tight, seq.compression.state, view)
    assert chosen is not None and chosen[1] == 23
    mask = chosen[0]
    rows = {tuple(row.nonzero().squeeze(-1).tolist()) for row in mask.reshape(-1, seq.kv_len)}
    assert len(rows) > 1  # heads disagree about which tokens matter
    core.kv_cache.compact(seq, plan_compaction(mask, 23))
    assert seq.kv_len == 23 and len(seq.block_table) == core.kv_cache.blocks_for(23)
    core.abort_request(seq.request_id)
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks


def test_rkv_at_its_defaults_stays_within_budget_plus_128(llm, english_prompts):
    core = with_engine(llm, num_kv_blocks=48, block_size=16).engine
    budget = 40
    params = SamplingParams(
        max_tokens=300,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "rkv", "budget": budget},
    )
    for prompt in english_prompts[:2]:
        core.add_request(prompt, params)
    peak = 0
    while core.has_unfinished_requests():
        core.step()
        for seq in core.scheduler.running:
            peak = max(peak, seq.kv_len)
            assert seq.kv_len <= budget + 128
    assert budget + 64 < peak  # it did grow past the budget between compressions
    assert core.kv_cache.num_free_blocks == 48
