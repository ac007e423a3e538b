"""Per-step telemetry: KV lengths, bytes in use, attention FLOPs."""

from __future__ import annotations

from conftest import with_engine

from thinfer import SamplingParams


def test_step_stats_track_prefill_and_decode(llm):
    engine = with_engine(llm, num_kv_blocks=64, block_size=8).engine
    cfg = llm.model_config
    per_key = 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    engine.add_request([1] + list(range(100, 109)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefill of 10 tokens: causal, 10*10 - 10*9/2 = 55 keys attended
    stats = engine.last_stats
    assert stats.num_tokens == 10 and stats.num_sampled == 1
    assert stats.attention_flops == 55 * per_key
    assert list(stats.kv_lens.values()) == [10]
    assert stats.kv_blocks_in_use == 2
    assert stats.kv_bytes_in_use == 2 * engine.kv_cache.bytes_per_block
    assert stats.kv_bytes_in_use == 2 * 8 * cfg.kv_elements_per_token * 4  # fp32
    engine.step()  # one decode token attends 11 keys
    assert engine.last_stats.attention_flops == 11 * per_key
    assert engine.last_stats.tokens_per_second > 0


def test_stats_show_memory_freed_by_compression(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=64, block_size=8).engine
    params = SamplingParams(
        max_tokens=40,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "window", "budget": 16},
    )
    engine.add_request(english_prompts[0], params)
    used, compressing = [], []
    while engine.has_unfinished_requests():
        engine.step()
        used.append(engine.last_stats.kv_blocks_in_use)
        compressing.append(engine.last_stats.compression_seconds)
    assert max(used) <= 2 + 1 and used[-1] == 0  # a 16-slot window never holds more
    assert all(t > 0 for t in compressing[:-1])  # timed whenever the stage ran
    assert compressing[-1] == 0.0  # the last token ends the request: nothing to compress
