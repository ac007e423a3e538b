"""The engine API tools use: per-request KV figures, queue counts, the factory, delta outputs."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import with_engine

from thinfer import LLM, SamplingParams
from thinfer.config import EngineConfig
from thinfer.engine.factory import build_engine
from thinfer.outputs import RequestOutputKind

PROMPT = [1, 504, 3458, 282, 4649, 314, 2]  # 7 token ids


def run(engine, prompt, params):
    """Step `engine` until its one request finished; every output, in order."""
    request_id = engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [out for out in engine.step() if out.request_id == request_id]
    return outs


# ----- KV figures ------------------------------------------------------------------------
def test_full_cache_peak_counts_every_written_token(llm):
    engine = with_engine(llm, num_kv_blocks=64).engine
    outs = run(engine, PROMPT, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    # Each output follows one model step: prompt + tokens sampled so far - 1 are written.
    for out in outs[:-1]:
        generated = out.metrics.num_generated_tokens
        assert out.metrics.kv_slots == len(PROMPT) + generated - 1
    final = outs[-1].metrics
    assert final.peak_kv_slots == len(PROMPT) + 20 - 1  # the last token is never written
    assert final.sample_peak_kv_slots == [final.peak_kv_slots]
    assert final.kv_slots == 0  # finished: its blocks are free
    cfg = llm.model_config
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32
    assert final.kv_bytes_per_slot == per_slot
    assert final.peak_kv_bytes == final.peak_kv_slots * per_slot


def test_window_peak_is_the_budget_and_requests_sum_their_samples(llm):
    engine = with_engine(llm, num_kv_blocks=64).engine
    budget = 16
    params = SamplingParams(
        n=2,
        max_tokens=40,
        temperature=0.8,
        seed=1,
        ignore_eos=True,
        kv_compression={"method": "window", "budget": budget},
    )
    outs = run(engine, PROMPT, params)
    final = outs[-1].metrics
    # The slot of the token being written counts: the cache holds `budget` slots at its peak.
    assert final.sample_peak_kv_slots == [budget, budget]
    assert final.peak_kv_slots == 2 * budget  # both samples decode in the same steps
    # After a step's eviction each sample holds budget - 1 slots, ready for the next token.
    assert outs[-2].metrics.kv_slots == 2 * (budget - 1)


def test_metrics_are_snapshots(llm):
    engine = with_engine(llm, num_kv_blocks=64).engine
    outs = run(engine, PROMPT, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    peaks = [out.metrics.peak_kv_slots for out in outs]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]


# ----- queue counts ----------------------------------------------------------------------
def test_queue_counts(llm):
    engine = with_engine(llm, num_kv_blocks=64, max_num_seqs=1).engine
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(PROMPT, params) for _ in range(3)]
    counts = (engine.get_num_running_requests(), engine.get_num_waiting_requests())
    assert counts == (0, 3) and engine.get_num_unfinished_requests() == 3
    engine.step()
    assert engine.get_running_request_ids() == {ids[0]}
    assert (engine.get_num_running_requests(), engine.get_num_waiting_requests()) == (1, 2)
    engine.abort_request(ids[2])
    assert (engine.get_num_running_requests(), engine.get_num_waiting_requests()) == (1, 1)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.get_num_unfinished_requests() == 0 == engine.get_num_waiting_requests()
    assert engine.num_preemptions == 0


# ----- factory ---------------------------------------------------------------------------
def test_build_engine_shares_weights_with_its_own_settings(llm):
    config = EngineConfig(num_kv_blocks=40, max_num_seqs=2, block_size=8)
    engine = build_engine(llm.loaded, config, kv_compression={"method": "window", "budget": 32})
    assert engine.model is llm.engine.model
    assert engine.kv_cache.num_blocks == 40 and engine.kv_cache.block_size == 8
    assert engine.config is config and engine.max_model_len == llm.max_model_len
    assert engine.default_compression.method == "window"
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.config.max_num_seqs = 4  # type: ignore[misc]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = run(engine, PROMPT, params)[-1].outputs[0].token_ids
    assert ours == llm.generate(PROMPT, params)[0].outputs[0].token_ids


def test_build_engine_rejects_bad_settings(llm):
    context = llm.model_config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's context"):
        build_engine(llm.loaded, EngineConfig(num_kv_blocks=4, max_model_len=context + 1))
    with pytest.raises(ValueError, match="not to a loaded model"):
        build_engine(llm.loaded, EngineConfig(num_kv_blocks=4), dtype="float16")
    with pytest.raises(ValueError, match="not to a loaded model"):
        LLM(llm.loaded, device="cpu", num_kv_blocks=4)


def test_llm_over_a_loaded_model(llm):
    other = LLM(llm.loaded, num_kv_blocks=32, max_num_seqs=3)
    assert other.engine.model is llm.engine.model and other.engine is not llm.engine
    assert other.engine.config.max_num_seqs == 3 and other.source == llm.source
    assert other.tokenizer is llm.tokenizer


# ----- delta outputs ---------------------------------------------------------------------
def test_stream_deltas_add_up_to_the_final_output(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=128)
    params = SamplingParams(n=2, max_tokens=24, temperature=0.9, seed=4, logprobs=2)
    outs = list(engine.stream(english_prompts[1], params))
    final = outs[-1]
    assert final.finished and not any(out.finished for out in outs[:-1])
    for c in final.outputs:
        mine = [o for out in outs for o in out.outputs if o.index == c.index]
        assert "".join(o.delta_text for o in mine) == c.text
        assert [t for o in mine for t in o.delta_token_ids] == c.token_ids
        assert [lp for o in mine for lp in o.delta_logprobs] == c.logprobs
        assert len(c.token_ids) == len(c.logprobs) >= 1
        for o in mine[:-1]:  # intermediate outputs carry no full lists
            assert (o.text, o.token_ids, o.logprobs) == ("", [], None)
    assert (
        final.outputs[0].token_ids
        == llm.generate(english_prompts[1], params)[0].outputs[0].token_ids
    )


def test_cumulative_outputs_carry_everything_so_far(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=128)
    params = SamplingParams(
        max_tokens=12, temperature=0.0, logprobs=0, output_kind=RequestOutputKind.CUMULATIVE
    )
    outs = list(engine.stream(english_prompts[0], params))
    seen: list[int] = []
    for out in outs:
        c = out.outputs[0]
        seen += c.delta_token_ids
        assert c.token_ids == seen and len(c.logprobs) == len(seen)
    assert outs[-1].outputs[0].text == "".join(o.outputs[0].delta_text for o in outs)
    assert SamplingParams(output_kind="cumulative").output_kind is RequestOutputKind.CUMULATIVE
    with pytest.raises(ValueError):
        SamplingParams(output_kind="sometimes")


def test_stop_string_text_is_held_back_from_deltas(llm, english_prompts):
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    text = llm.generate(english_prompts[1], greedy)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    params = dataclasses.replace(greedy, stop=[stop])
    outs = list(with_engine(llm, num_kv_blocks=128).stream(english_prompts[1], params))
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.text == text[: text.index(stop)]
    sent = ""
    for out in outs:
        sent += out.outputs[0].delta_text
        assert final.text.startswith(sent)  # no piece of the stop string ever went out
    assert sent == final.text


def test_abort_returns_the_final_output(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=128).engine
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=1)
    request_id = engine.add_request(english_prompts[0], params)
    deltas: list[int] = []
    for _ in range(5):
        for out in engine.step():
            deltas += out.outputs[0].delta_token_ids
    final = engine.abort_request(request_id)
    assert final is not None and final.finished
    c = final.outputs[0]
    assert c.finish_reason == "abort" and c.token_ids == deltas and len(c.logprobs) == 5
    assert final.metrics.finished_time is not None and final.metrics.kv_slots == 0
    assert engine.abort_request(request_id) is None
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
