"""Trace replay: forced tokens go through the decode path exactly as generated ones do."""

from __future__ import annotations

import pytest
import torch
from conftest import with_engine

from thinfer import SamplingParams


def _logprobs(out) -> list[float]:
    return [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


@pytest.mark.parametrize(
    "compression",
    [None, {"method": "window", "budget": 12}, {"method": "h2o", "budget": 14}],
)
def test_replaying_a_generation_gives_its_logprobs_and_continuation(
    llm, english_prompts, compression
):
    prompt = english_prompts[1]
    params = dict(temperature=0.0, ignore_eos=True, logprobs=0, kv_compression=compression)
    generated = llm.generate(prompt, SamplingParams(max_tokens=30, **params))[0].outputs[0]
    forced = generated.token_ids[:20]
    replay = llm.generate(prompt, SamplingParams(max_tokens=30, forced_tokens=forced, **params))[
        0
    ].outputs[0]
    assert replay.token_ids == generated.token_ids  # forced part, then the same continuation
    assert len(replay.forced_logprobs) == 20
    torch.testing.assert_close(
        torch.tensor(replay.forced_logprobs),
        torch.tensor(_logprobs(generated)[:20]),
        atol=1e-4,
        rtol=0,
    )


def test_forced_tokens_override_the_model_and_ignore_stops(llm, english_prompts):
    eos = llm.tokenizer.eos_token_ids[0]
    text_ids = llm.tokenizer.encode(" bananas. Then")
    forced = text_ids + [eos] + text_ids
    out = llm.generate(
        english_prompts[0],
        SamplingParams(
            max_tokens=len(forced) + 3, temperature=0.0, stop=["."], forced_tokens=forced
        ),
    )[0].outputs[0]
    assert out.token_ids[: len(forced)] == forced  # EOS and "." did not stop the replay
    assert all(lp <= 0 for lp in out.forced_logprobs)
    assert out.forced_logprobs[0] < -3  # " bananas" after "The capital of France is"
    assert out.finish_reason in ("stop", "length")


def test_forced_tokens_are_validated(llm, english_prompts):
    with pytest.raises(ValueError, match="forced_tokens"):
        SamplingParams(max_tokens=2, forced_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match="forced_tokens"):
        SamplingParams(max_tokens=4, forced_tokens=[-1])
    engine = with_engine(llm)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(english_prompts[0], SamplingParams(max_tokens=4, forced_tokens=[10**7]))
