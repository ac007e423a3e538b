"""Bounded work per request and per queue: prompts, sequences, stop lists are 400s (never a
retryable 429), waiting prompt tokens are bounded (429), a request past its timeout is
aborted, a chat without max_tokens gets the configured default, and prompts are tokenized
off the engine thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from thinfer import LLM, SamplingParams
from thinfer.server import async_engine as async_engine_module
from thinfer.server.app import create_app
from thinfer.server.async_engine import AsyncEngine
from thinfer.server.limits import ServerLimits
from thinfer.server.protocol import MAX_PROMPTS, MAX_SEQUENCES, MAX_STOP_STRINGS
from thinfer.server.request_stream import QueueFullError


@pytest.fixture(scope="module")
def tiny() -> LLM:
    return LLM(model="tiny", load_format="dummy", device="cpu", num_kv_blocks=256)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [[5, 6]] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": [[5, 6]] * 8, "n": MAX_SEQUENCES // 8 + 1}, "n"),
        ({"prompt": [5, 6], "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"prompt": [5, 6], "stop": "y" * 513}, "stop"),
        ({"prompt": [5, 6], "stop_token_ids": [3] * 1025}, "stop_token_ids"),
    ],
)
def test_oversized_requests_are_400s(tiny, body, param):
    with TestClient(create_app(tiny, "tiny")) as client:
        r = client.post("/v1/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_limits_refuse_what_does_not_fit():
    limits = ServerLimits(max_waiting=2, max_waiting_tokens=100)
    limits.check_admission(1, 40, [60])
    with pytest.raises(QueueFullError, match="too many requests waiting"):
        limits.check_admission(2, 0, [1])
    with pytest.raises(QueueFullError, match="too many prompt tokens waiting"):
        limits.check_admission(0, 40, [61])
    assert ServerLimits(request_timeout_s=5).expired([("a", 0.0), ("b", 8.0)], 10.0) == ["a"]
    with pytest.raises(ValueError, match="request_timeout_s must be > 0"):
        ServerLimits(request_timeout_s=0)


def _run(tiny: LLM, test, limits: ServerLimits) -> None:
    async def main() -> None:
        engine = AsyncEngine(LLM(tiny.loaded, num_kv_blocks=256).engine, limits=limits)
        engine.start()
        try:
            await asyncio.wait_for(test(engine), timeout=60)
        finally:
            engine.stop()

    asyncio.run(main())


def test_waiting_tokens_bound_and_timeout(tiny):
    async def test(engine: AsyncEngine) -> None:
        slow = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
        stream = await engine.add(["long"], [[5] * 30], slow)
        with pytest.raises(QueueFullError, match="prompt tokens waiting"):
            await engine.add(["w1", "w2"], [[5] * 30, [6] * 30], slow)  # 60 > 50
        items = [item async for item in stream]
        final = items[-1]
        assert final.outputs[0].finish_reason == "abort"  # past its 0.3 s timeout
        assert 0 < len(final.outputs[0].token_ids) < 2000

    _run(tiny, test, ServerLimits(max_waiting_tokens=50, request_timeout_s=0.3))


def test_chat_default_max_tokens_and_off_thread_tokenizing(monkeypatch):
    llm = LLM(num_kv_blocks=256)  # the default model: it has a chat template
    threads = []
    real = async_engine_module.tokenize

    def recording(engine, prompt):
        threads.append(threading.current_thread().name)
        return real(engine, prompt)

    monkeypatch.setattr(async_engine_module, "tokenize", recording)
    app = create_app(llm, "m", limits=ServerLimits(default_max_tokens=3))
    messages = [{"role": "user", "content": "Count to one hundred."}]
    with TestClient(app) as client:
        body = {"messages": messages, "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = client.post("/v1/chat/completions", json=body | {"max_tokens": 5})
        assert r.json()["usage"]["completion_tokens"] == 5
    assert threads and "thinfer-engine" not in threads


def test_shutdown_during_a_long_step_still_ends_every_stream(tiny):
    """The stats are published after each step; during the first, long step they still say
    nothing is running. Shutdown must drain the live requests, so the stream ends with its
    final (aborted) output before shutdown returns."""
    engine = LLM(tiny.loaded, num_kv_blocks=256).engine
    real_step = engine.step

    def long_step():
        time.sleep(1.5)
        return real_step()

    engine.step = long_step

    async def main() -> None:
        server = AsyncEngine(engine)
        server.start()
        try:
            params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
            stream = await server.add(["r"], [[5, 6, 7]], params)
            await asyncio.sleep(0.2)  # the first step is running
            await server.shutdown(grace=0.0)
            queue = stream._queue  # what the engine delivered before shutdown returned
            items = [queue.get_nowait() for _ in range(queue.qsize())]
            assert items and items[-1].finished
            assert items[-1].outputs[0].finish_reason == "abort"
        finally:
            server.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_kv_pool_fraction_is_a_flag():
    import argparse

    from thinfer.cli_args import add_model_args, llm_kwargs

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert llm_kwargs(parser.parse_args([]))["kv_cache_memory_fraction"] == 0.5
    args = parser.parse_args(["--kv-cache-memory-fraction", "0.2"])
    assert llm_kwargs(args)["kv_cache_memory_fraction"] == 0.2
