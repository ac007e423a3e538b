"""One request cannot fail its batch mates: what would break the batched sampler is refused
at admission, and a row that fails anyway (an injected fault: every known trigger is
refused first) ends its own request with an error while the others go on, token for token."""

from __future__ import annotations

import asyncio
import re

import pytest
from conftest import with_engine

from thinfer import LLM, SamplingParams
from thinfer.engine import forcing
from thinfer.server.async_engine import AsyncEngine
from thinfer.server.request_stream import StreamError

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
POISON_TOP_K = 7  # the marker of the row the injected fault breaks


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=64)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(repetition_penalty=1e-300), "repetition_penalty must be in [0.01, 100.0]"),
        (dict(repetition_penalty=1e300), "repetition_penalty must be in [0.01, 100.0]"),
        (dict(stop_token_ids=[2**63]), "stop_token_ids: token ids must be below the vocab"),
        (dict(forced_tokens=[512]), "forced_tokens: token ids must be below the vocab"),
        (dict(stop_token_ids=list(range(512)), min_tokens=2), "ban all 512 tokens"),
        (dict(stop_token_ids=[0, 1, *range(3, 512)], min_tokens=1), "ban all 512"),  # + EOS 2
    ],
)
def test_admission_refuses_what_the_sampler_could_not_do(tiny, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny.generate([[5, 6, 7]], SamplingParams(max_tokens=4, **params))
    assert not tiny.engine.has_unfinished_requests()
    # all but one token banned is fine: the one left is sampled
    ok = SamplingParams(max_tokens=2, min_tokens=2, stop_token_ids=[0, 1, *range(3, 511)])
    assert tiny.generate([[5, 6, 7]], ok)[0].outputs[0].token_ids == [511, 511]


@pytest.fixture
def poisoned_sampler(monkeypatch):
    """The batched sampler raises whenever the poison row is in the batch (as a NaN or an
    index error would), and works row by row for every other row."""
    real = forcing.sample

    def sample(logits, rows):
        if any(row.params.top_k == POISON_TOP_K for row in rows):
            raise RuntimeError("injected sampler fault")
        return real(logits, rows)

    monkeypatch.setattr(forcing, "sample", sample)


def _run_engine(engine, requests):
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return [finals[i] for i in ids]


def test_a_failing_row_fails_its_request_alone(tiny, poisoned_sampler):
    engine = with_engine(tiny, 64).engine
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    alone = _run_engine(engine, [(p, GREEDY) for p in prompts[:2]])
    poison = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, top_k=POISON_TOP_K)
    mixed = _run_engine(engine, [(prompts[0], GREEDY), (prompts[2], poison), (prompts[1], GREEDY)])
    failed = mixed[1]
    assert failed.error and "injected sampler fault" in failed.error
    assert failed.outputs[0].finish_reason == "error" and not failed.outputs[0].token_ids
    for before, after in zip(alone, [mixed[0], mixed[2]], strict=True):
        assert after.error is None
        assert after.outputs[0].token_ids == before.outputs[0].token_ids
    assert engine.kv_cache.num_used_blocks == 0


def test_llm_generate_raises_naming_the_failed_request(tiny, poisoned_sampler):
    llm = with_engine(tiny, 64)
    poison = SamplingParams(max_tokens=3, temperature=0.0, top_k=POISON_TOP_K)
    with pytest.raises(RuntimeError, match=r"request \S+ failed: sampling failed"):
        llm.generate([[5, 6], [7, 8]], [GREEDY, poison])
    assert not llm.engine.has_unfinished_requests()


def test_the_server_fails_that_stream_alone(tiny, poisoned_sampler):
    engine = with_engine(tiny, 64).engine

    async def main() -> None:
        server = AsyncEngine(engine)
        server.start()
        try:
            poison = SamplingParams(max_tokens=6, temperature=0.0, top_k=POISON_TOP_K)
            streams = [
                await server.add(["good"], [[5, 6, 7]], GREEDY),
                await server.add(["bad"], [[9, 10]], poison),
            ]
            good, bad = [[item async for item in s] for s in streams]
            assert isinstance(bad[-1], StreamError) and "injected sampler fault" in bad[-1].message
            assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 6
        finally:
            server.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_a_failed_request_is_counted_in_the_metrics(tiny, poisoned_sampler):
    from fastapi.testclient import TestClient

    from thinfer.server.app import create_app

    app = create_app(with_engine(tiny, 64), "tiny")
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    with TestClient(app) as client:
        bad = client.post("/v1/completions", json=body | {"top_k": POISON_TOP_K})
        assert bad.status_code == 500 and "injected sampler fault" in bad.text
        assert client.post("/v1/completions", json=body).status_code == 200
        text = client.get("/metrics").text
    assert 'vllm:request_success_total{finished_reason="error",model_name="tiny"} 1.0' in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 1.0' in text
