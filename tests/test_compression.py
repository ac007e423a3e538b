"""KV-cache compression: kept sets match the published definitions, memory is really freed,
and compression never changes what it should not."""

from __future__ import annotations

import math

import pytest
import torch
from compression_utils import select
from conftest import with_engine
from hypothesis import given
from hypothesis import strategies as st

from thinfer import SamplingParams
from thinfer.compression import CompressionConfig
from thinfer.compression.slot_state import SlotState
from thinfer.models.rope import RotaryEmbedding, rotate


def dense_window(kv_len: int, budget: int) -> list[int]:
    """Window attention: the new token sees the last `budget` tokens, itself included."""
    return [i for i in range(kv_len) if i >= kv_len - (budget - 1)]


def dense_streaming(kv_len: int, budget: int, sinks: int) -> list[int]:
    recent = budget - 1 - sinks
    return [i for i in range(kv_len) if i < sinks or i >= kv_len - recent]


@given(st.integers(2, 300), st.integers(0, 400))
def test_window_keeps_the_last_tokens(budget, kv_len):
    keep = select(CompressionConfig("window", budget=budget), kv_len)
    if kv_len < budget:
        assert keep is None
    else:
        assert keep.tolist() == dense_window(kv_len, budget)


@given(st.integers(6, 300), st.integers(0, 5), st.integers(0, 400))
def test_streamingllm_always_keeps_sinks_and_recent(budget, sinks, kv_len):
    config = CompressionConfig("streamingllm", budget=budget, sink_tokens=sinks)
    keep = select(config, kv_len)
    if kv_len < budget:
        assert keep is None
        return
    assert keep.tolist() == dense_streaming(kv_len, budget, sinks)
    assert set(range(sinks)) <= set(keep.tolist())


@given(st.integers(8, 300), st.floats(0.0, 0.95), st.integers(0, 7), st.data())
def test_uniform_trigger_keeps_window_plus_ratio(budget, ratio, window, data):
    kv_len = data.draw(st.integers(budget, 3 * budget))
    config = CompressionConfig(
        "streamingllm", budget=budget, window=window, ratio=ratio, sink_tokens=2, trigger="uniform"
    )
    keep = select(config, kv_len).tolist()
    old = kv_len - window
    expected_old = int(ratio * old)
    assert len(keep) == expected_old + window
    assert keep == sorted(set(keep))
    assert keep[len(keep) - window :] == list(range(old, kv_len))  # recent window kept
    assert set(range(min(2, expected_old))) <= set(keep)  # sinks first among the old


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "nope", "budget": 10},
        {"method": "window"},
        {"method": "window", "budget": 10, "window": 10},
        {"method": "window", "budget": 10, "ratio": 1.0},
        {"method": "window", "budget": 10, "trigger": "sometimes"},
        {"method": "window", "budget": 10, "colour": "red"},
        {"method": "window", "budget": 10, "reassign_positions": True},
        {"method": "snapkv", "budget": 8},  # observation window (8) must fit the budget
        {"method": "rkv", "budget": 64, "pool_kernel": 4},
        {"method": "rkv", "budget": 64, "interval": 0},
        {"method": "h2o", "budget": 10, "redundancy_lambda": "high"},
        {"method": "window", "budget": 10, "window": "x"},
        {"method": "streamingllm", "budget": 10, "reassign_positions": "yes"},
    ],
)
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError, match="kv_compression"):
        SamplingParams(kv_compression=bad)


def generate(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("method", ["window", "streamingllm"])
def test_budget_beyond_the_sequence_changes_nothing(llm, english_prompts, method):
    full = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = SamplingParams(
        max_tokens=20,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": method, "budget": 500},
    )
    assert generate(llm, english_prompts[:4], roomy) == generate(llm, english_prompts[:4], full)


def test_kv_length_stays_within_budget_and_blocks_are_reused(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=64, block_size=8)
    core = engine.engine
    budget = 24
    params = SamplingParams(
        max_tokens=60,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "streamingllm", "budget": budget},
    )
    # 4 x (prompt + 60) slots would need far more than 64 blocks without compression
    for prompt in english_prompts[:4]:
        core.add_request(prompt, params)
    while core.has_unfinished_requests():
        core.step()
        for seq in core.scheduler.running:
            prompt_len = len(seq.prompt_token_ids)
            assert seq.kv_len <= max(prompt_len, budget)
            assert len(seq.block_table) == core.kv_cache.blocks_for(seq.kv_len)
    assert core.kv_cache.num_free_blocks == 64


def test_without_compression_the_same_load_would_not_fit(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="can never fit"):
        engine.generate(english_prompts[0], SamplingParams(max_tokens=60))
    squeezed = SamplingParams(
        max_tokens=60, ignore_eos=True, kv_compression={"method": "window", "budget": 16}
    )
    assert len(engine.generate(english_prompts[0], squeezed)[0].outputs[0].token_ids) == 60


def test_mixed_methods_in_one_batch_match_running_alone(llm, english_prompts):
    configs = [
        None,
        {"method": "window", "budget": 16},
        {"method": "streamingllm", "budget": 20, "sink_tokens": 4},
        {"method": "window", "budget": 40, "window": 8, "ratio": 0.5, "trigger": "uniform"},
    ]
    configs += [
        {"method": "sepllm", "budget": 30, "window": 8, "trigger": "uniform"},
        {"method": "sepllm", "budget": 24, "sink_tokens": 2},
        {"method": "h2o", "budget": 20},
        {"method": "snapkv", "budget": 20, "interval": 8, "observation_window": 4},
        {"method": "rkv", "budget": 24, "window": 8, "trigger": "uniform"},
    ]
    params = [
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, kv_compression=c)
        for c in configs
    ]
    prompts = english_prompts[:9]
    together = generate(llm, prompts, params)
    alone = [generate(llm, [p], q)[0] for p, q in zip(prompts, params)]
    assert together == alone
    assert together[1] != together[0]  # a 16-slot window does change the text


def test_engine_default_compression(llm, english_prompts):
    engine = with_engine(llm)
    engine.engine.default_compression = CompressionConfig("window", budget=16)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    explicit = params.__class__(
        max_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "window", "budget": 16},
    )
    assert generate(engine, english_prompts[:1], params) == generate(
        llm, english_prompts[:1], explicit
    )


def test_positions_stay_absolute_after_eviction(llm, english_prompts):
    engine = with_engine(llm)
    core = engine.engine
    params = SamplingParams(
        max_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "window", "budget": 8},
    )
    core.add_request(english_prompts[1], params)
    for _ in range(10):
        core.step()
    seq = core.scheduler.running[0]
    assert seq.kv_len < seq.num_computed_tokens  # evicted, yet positions count every token
    ids, positions, _, _ = core.runner.prepare(core.scheduler.schedule())
    assert positions.tolist() == [seq.num_computed_tokens]
    assert torch.equal(ids, torch.tensor([seq.all_token_ids[-1]]))


def test_rotations_compose():
    rotary = llm_rotary()
    keys = torch.randn(5, 3, rotary.cos.shape[-1])
    at = rotary.angles(torch.tensor([7] * 5))
    moved = rotate(rotate(keys, at), rotary.angles(torch.tensor([30])))
    direct = rotate(keys, rotary.angles(torch.tensor([37] * 5)))
    torch.testing.assert_close(moved, direct, atol=1e-5, rtol=1e-5)


def llm_rotary() -> RotaryEmbedding:
    return RotaryEmbedding(64, 256, 10000.0, None, torch.float32, torch.device("cpu"))


def test_streamingllm_reassigned_positions_move_the_sinks(llm, english_prompts):
    """With reassign_positions the sinks sit at their in-cache distance from the query: their
    cached keys are the original ones rotated forward by the number of evicted tokens."""
    budget, sinks = 16, 4
    config = {"method": "streamingllm", "budget": budget, "sink_tokens": sinks}
    results = {}
    for reassign in (False, True):
        core = with_engine(llm).engine
        params = SamplingParams(
            max_tokens=30,
            temperature=0.0,
            ignore_eos=True,
            logprobs=1,
            kv_compression={**config, "reassign_positions": reassign},
        )
        core.add_request(english_prompts[0], params)  # 5 prompt tokens, fewer than the budget
        for _ in range(20):
            core.step()
        seq = core.scheduler.running[0]
        results[reassign] = (seq, core.kv_cache.read_keys(seq, 0, sinks))
        core.abort_request(seq.request_id)
    (plain, plain_keys), (moved, moved_keys) = results[False], results[True]
    shift = moved.num_computed_tokens - moved.kv_len
    assert shift > 0
    expected = rotate(plain_keys, llm.engine.model.rotary_emb.angles(torch.tensor([shift])))
    torch.testing.assert_close(moved_keys, expected, atol=1e-5, rtol=1e-5)
    # same tokens until the first eviction, different log-probabilities afterwards
    first = budget - len(plain.prompt_token_ids)
    plain_lp = [max(d.values()) for d in plain.logprobs]
    moved_lp = [max(d.values()) for d in moved.logprobs]
    assert plain_lp[:first] == moved_lp[:first]
    assert plain_lp[first + 1 :] != moved_lp[first + 1 :]


def late_state(config: CompressionConfig, kv_len: int, sinks: int, first_late: int) -> SlotState:
    """A cache long after many evictions: slots 0..sinks-1 hold the sinks, the rest a run of
    tokens from position `first_late` on (far beyond the cache length)."""
    positions = list(range(sinks)) + list(range(first_late, first_late + kv_len - sinks))
    state = SlotState((), config.params.slot_values, torch.device("cpu"))
    state.append(torch.tensor(positions), torch.zeros(kv_len, dtype=torch.bool))
    return state


@pytest.mark.parametrize("prefix", [(), (2, 3)])
def test_append_range_equals_append(prefix):
    """`append_range` (one slot from Python values, or a run) leaves the state `append`
    leaves, across capacity growth, with both protection bounds."""
    states = [SlotState(prefix, ("a", "b"), torch.device("cpu")) for _ in range(2)]
    protect_below, protect_from = 5, 30
    runs = [(0, 7)] + [(p, 1) for p in range(7, 40)] + [(40, 9)]
    for first, count in runs:
        positions = torch.arange(first, first + count)
        states[0].append(positions, (positions < protect_below) | (positions >= protect_from))
        states[1].append_range(first, count, protect_below, protect_from)
        for state in states:
            state.value("a")[..., -1] = float(first)
    assert torch.equal(states[0].positions, states[1].positions)
    assert torch.equal(states[0].protected, states[1].protected)
    assert states[1].protected.sum() == protect_below * math.prod(prefix) + 19 * math.prod(prefix)
    for name in ("a", "b"):
        assert torch.equal(states[0].value(name), states[1].value(name))


@pytest.mark.parametrize("trigger", ["native", "uniform"])
def test_streamingllm_keeps_its_sinks_long_after_the_budget(trigger):
    """Positions grow without bound while the cache stays at the budget: the sinks must still
    outrank every other token (they lost to tokens past ~3x the budget before)."""
    budget, sinks = 24, 4
    config = CompressionConfig(
        "streamingllm", budget=budget, sink_tokens=sinks, trigger=trigger, window=6
    )
    for first_late in (budget, 3 * budget, 50 * budget):
        state = late_state(config, budget, sinks, first_late)
        tokens = [1] * (first_late + budget)
        keep = select(config, budget, generated=budget, state=state, tokens=tokens, prompt_len=1)
        assert set(range(sinks)) <= set(keep.tolist()), (trigger, first_late)
