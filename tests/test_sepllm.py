"""SepLLM: initial tokens + separators of the middle + recent window, at the cap."""

from __future__ import annotations

import pytest
import torch
from compression_utils import select
from conftest import with_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from thinfer import SamplingParams
from thinfer.compression import CompressionConfig
from thinfer.compression.methods.sepllm import separator_token_ids
from thinfer.compression.slot_state import SlotState

SEPARATORS = frozenset({0, 1})
SEPARATOR_IDS = torch.tensor(sorted(SEPARATORS))


def keep_of(config: CompressionConfig, tokens: list[int]) -> torch.Tensor | None:
    return select(config, len(tokens), tokens=tokens, resources=SEPARATOR_IDS)


def dense_sepllm(tokens: list[int], cap: int, sinks: int, recent: int, budget: int) -> list[int]:
    """The definition: first a, the last s separators of the middle, the last w."""
    length = len(tokens)
    if length < cap:
        return list(range(length))
    middle_end = max(sinks, length - recent)
    seps = [i for i in range(sinks, middle_end) if tokens[i] in SEPARATORS]
    return (
        list(range(min(sinks, length)))
        + (seps[-budget:] if budget else [])
        + list(range(middle_end, length))
    )


@settings(max_examples=80, deadline=None)
@given(st.integers(8, 60), st.integers(0, 4), st.integers(1, 20), st.integers(0, 6), st.data())
def test_kept_set_equals_dense_definition(cap, sinks, recent, separators, data):
    recent = min(recent, cap - sinks - 1)
    tokens = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=2 * cap))
    config = CompressionConfig(
        "sepllm", budget=cap, sink_tokens=sinks, window=recent, separators=separators
    )
    keep = keep_of(config, tokens)
    expected = dense_sepllm(tokens, cap, sinks, recent, separators)
    assert (keep is None and expected == list(range(len(tokens)))) or keep.tolist() == expected


def test_fewer_separators_than_the_separator_budget():
    tokens = [0, 1, 0, 1, 0, 5, 5, 5]  # five separators in the middle, budget for six
    config = CompressionConfig("sepllm", budget=8, sink_tokens=0, window=1, separators=6)
    assert keep_of(config, tokens).tolist() == [0, 1, 2, 3, 4, 7]


def test_separator_ids_of_the_real_tokenizer(llm):
    ids = separator_token_ids(llm.tokenizer)
    for text in [".", ",", "?", "\n", " "]:
        assert llm.tokenizer.encode(text)[0] in ids, text
    assert llm.tokenizer.encode("hello")[0] not in ids
    # an exact list: runs of newlines or a mark glued to a space are not separators
    for text in ["\n\n", " ."]:
        encoded = llm.tokenizer.encode(text)
        if len(encoded) == 1:
            assert encoded[0] not in ids, text


def test_sepllm_on_the_real_model(llm, english_prompts):
    engine = with_engine(llm, num_kv_blocks=64, block_size=8)
    full = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    roomy = SamplingParams(
        max_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "sepllm", "budget": 400},
    )
    prompts = english_prompts[:3]
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, roomy)] == [
        o.outputs[0].token_ids for o in engine.generate(prompts, full)
    ]
    tight = SamplingParams(
        max_tokens=80,
        temperature=0.0,
        ignore_eos=True,
        kv_compression={"method": "sepllm", "budget": 48, "window": 16},
    )
    core = engine.engine
    for prompt in prompts:
        core.add_request(prompt, tight)
    while core.has_unfinished_requests():
        core.step()
        for seq in core.scheduler.running:
            assert seq.kv_len + 1 <= max(len(seq.prompt_token_ids) + 1, 48)
    assert core.kv_cache.num_free_blocks == 64


@pytest.mark.parametrize("trigger", ["native", "uniform"])
def test_sinks_and_separators_outrank_the_rest_long_after_the_budget(trigger):
    """Positions far beyond the cache length (after many evictions): the sinks are kept, and
    under the uniform trigger every old separator outranks every old non-separator, however
    old it is (both lost to late tokens when scores were scaled by the cache length)."""
    budget, sinks, first_late = 24, 2, 50 * 24
    config = CompressionConfig(
        "sepllm", budget=budget, sink_tokens=sinks, trigger=trigger, window=6, ratio=0.3
    )
    positions = list(range(sinks)) + list(range(first_late, first_late + budget - sinks))
    tokens = [5] * (first_late + budget)
    separators = positions[sinks:8:2]  # three old separators: with the sinks, what uniform keeps
    for p in separators:
        tokens[p] = 0
    state = SlotState((), config.params.slot_values, torch.device("cpu"))
    state.append(torch.tensor(positions), torch.zeros(budget, dtype=torch.bool))
    keep = select(
        config, budget, generated=budget, state=state, tokens=tokens, resources=SEPARATOR_IDS,
        prompt_len=1,
    ).tolist()  # fmt: skip
    assert set(range(sinks)) <= set(keep)
    if trigger == "uniform":
        assert {positions.index(p) for p in separators} <= set(keep)
