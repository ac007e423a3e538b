"""Scheduler, KV cache and engine behaviour on the real default model."""

from __future__ import annotations

import pytest
import torch
from conftest import with_engine

from thinfer import SamplingParams
from thinfer.engine.kv_cache import KVCache
from thinfer.outputs import RequestOutputKind

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [c.token_ids for out in outputs for c in out.outputs]


def test_no_block_leaks_after_mixed_requests(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=256, max_num_seqs=4)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=20, temperature=0.8, seed=3, n=2),
        SamplingParams(max_tokens=30, temperature=0.0, stop=["."]),
    ]
    params = [params[i % 3] for i in range(len(english_prompts))]
    outs = engine.generate(english_prompts, params)
    assert all(out.finished for out in outs)
    kv = engine.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert not engine.engine.has_unfinished_requests()


def test_forced_preemption_keeps_outputs(llm, english_prompts):
    roomy = with_engine(llm, num_kv_blocks=512)
    tight = with_engine(llm, num_kv_blocks=14, block_size=16)
    sampled = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    params = [greedy, sampled] * 4
    prompts = english_prompts[:8]
    expected = token_ids(roomy.generate(prompts, params))
    got = token_ids(tight.generate(prompts, params))
    assert tight.engine.num_preemptions > 0
    assert got == expected
    kv = tight.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_chunked_prefill_matches_whole_prefill(llm, english_prompts):
    whole = with_engine(llm)
    chunked = with_engine(llm, max_num_batched_tokens=7)
    assert token_ids(chunked.generate(english_prompts, GREEDY)) == token_ids(
        whole.generate(english_prompts, GREEDY)
    )


def test_running_batch_respects_limits(llm, english_prompts):
    engine = with_engine(llm, max_num_seqs=3, max_num_batched_tokens=32)
    scheduler = engine.engine.scheduler
    schedule = scheduler.schedule
    seen: list[tuple[int, int]] = []

    def recording_schedule():
        batch = schedule()
        seen.append((len(scheduler.running), sum(item.num_tokens for item in batch)))
        return batch

    scheduler.schedule = recording_schedule
    outs = engine.generate(english_prompts, GREEDY)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert max(running for running, _ in seen) == 3
    assert max(tokens for _, tokens in seen) == 32  # long prompts were chunked to the budget


def test_requests_join_mid_run(llm, english_prompts):
    alone = with_engine(llm)
    expected = token_ids(alone.generate(english_prompts[:4], GREEDY))
    engine = with_engine(llm).engine
    results: dict[str, list[int]] = {}
    ids = [engine.add_request(english_prompts[0], GREEDY)]
    for step in range(200):
        if step in (3, 9, 15):
            ids.append(engine.add_request(english_prompts[len(ids)], GREEDY))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        if len(results) == 4:
            break
    assert [results[i] for i in ids] == expected


def test_seed_reproduces_whatever_the_batch(llm, english_prompts):
    engine = with_engine(llm)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=1234)
    alone = engine.generate(english_prompts[1], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=30, temperature=0.7, seed=s) for s in (1, 2)]
    mixed = engine.generate(
        [english_prompts[0], english_prompts[1], english_prompts[4]],
        [others[0], seeded, others[1]],
    )
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=4321)
    assert engine.generate(english_prompts[1], other_seed)[0].outputs[0].token_ids != alone


def test_n_samples_use_consecutive_seeds(llm, english_prompts):
    engine = with_engine(llm)
    params = SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=50)
    out = engine.generate(english_prompts[2], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        single = SamplingParams(max_tokens=16, temperature=1.0, seed=50 + c.index)
        assert engine.generate(english_prompts[2], single)[0].outputs[0].token_ids == c.token_ids


def test_logprobs_of_chosen_tokens(llm, english_prompts):
    out = llm.generate(
        english_prompts[0], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3)
    )[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) in (3, 4)
        assert entry[token] == max(entry.values())  # greedy picks the most likely
        total += entry[token]
    assert abs(out.cumulative_logprob - total) < 1e-4


def test_stop_strings_and_stop_tokens(llm, english_prompts):
    free = llm.generate(english_prompts[1], SamplingParams(max_tokens=40, temperature=0.0))
    text = free[0].outputs[0].text
    stop = text.strip().split()[3]
    out = llm.generate(
        english_prompts[1], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop])
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)
    third = free[0].outputs[0].token_ids[2]
    out = llm.generate(
        english_prompts[1], SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[third])
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == third and out.token_ids[-1] == third


def test_eos_ends_and_min_tokens_defers_it(llm):
    eos = llm.tokenizer.eos_token_ids
    chat = [{"role": "user", "content": "Say hello."}]
    out = llm.chat(chat, SamplingParams(max_tokens=200, temperature=0.0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in eos
    longer = llm.chat(
        chat, SamplingParams(max_tokens=200, temperature=0.0, min_tokens=len(out.token_ids) + 5)
    )[0].outputs[0]
    assert not set(longer.token_ids[: len(out.token_ids) + 5]) & set(eos)


def test_streaming_increments_add_up(llm, english_prompts):
    # Cumulative outputs carry the text so far (delta outputs: tests/test_engine_api.py).
    params = SamplingParams(
        max_tokens=20, temperature=0.0, stop=["\n\n"], output_kind=RequestOutputKind.CUMULATIVE
    )
    expected = {o.outputs[0].text for o in llm.generate(english_prompts[:3], params)}
    texts: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    for inc in llm.stream(english_prompts[:3], params):
        texts[inc.request_id] = texts.get(inc.request_id, "") + inc.outputs[0].delta_text
        tokens.setdefault(inc.request_id, []).extend(inc.outputs[0].delta_token_ids)
        assert texts[inc.request_id] == inc.outputs[0].text
        assert tokens[inc.request_id] == inc.outputs[0].token_ids
    assert set(texts.values()) == expected


def test_abort_frees_blocks(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=64).engine
    request_id = engine.add_request(english_prompts[5], SamplingParams(max_tokens=100))
    engine.step()
    assert engine.kv_cache.num_free_blocks < 64
    engine.abort_request(request_id)
    assert engine.kv_cache.num_free_blocks == 64 and not engine.has_unfinished_requests()


def test_closing_a_stream_aborts(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=64)
    stream = engine.stream(english_prompts[:2], SamplingParams(max_tokens=50))
    next(stream)
    stream.close()
    assert engine.engine.kv_cache.num_free_blocks == 64


def test_request_timings(llm, english_prompts):
    out = llm.generate(english_prompts[3], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.metrics.time_to_first_token > 0
    assert out.metrics.time_per_output_token > 0


def test_dummy_preset_with_auto_sized_cache():
    from thinfer import LLM

    tiny = LLM(model="tiny", load_format="dummy", device="cpu", max_num_seqs=4)
    kv = tiny.engine.kv_cache
    assert kv.num_blocks == 4 * -(-tiny.max_model_len // kv.block_size)  # capped by need
    outs = tiny.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=5, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5]
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.generate("text needs a tokenizer", SamplingParams())


def test_streaming_n_samples(llm, english_prompts):
    params = SamplingParams(n=2, max_tokens=10, temperature=0.9, seed=5)
    texts = {0: "", 1: ""}
    for inc in llm.stream(english_prompts[0], params):
        for c in inc.outputs:
            texts[c.index] += c.delta_text
    final = llm.generate(english_prompts[0], params)[0]
    assert texts == {c.index: c.text for c in final.outputs}


def test_reserved_block_leaves_the_pool(llm):
    kv = KVCache(llm.engine.model_config, 4, 16, torch.float32, torch.device("cpu"))
    kv.reserve_block()
    assert (kv.num_usable_blocks, kv.capacity_tokens) == (3, 48)
    assert (kv.num_free_blocks, kv.num_used_blocks) == (3, 0)
    for _ in range(3):
        kv.reserve_block()
    with pytest.raises(RuntimeError, match="cannot reserve"):
        kv.reserve_block()
