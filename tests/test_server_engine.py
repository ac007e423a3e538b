"""`AsyncEngine` in-process: adds, aborts, the queue bound, and a step that raises."""

from __future__ import annotations

import asyncio

import pytest
from conftest import with_engine

from thinfer import SamplingParams
from thinfer.server.async_engine import AsyncEngine
from thinfer.server.request_stream import ChatPrompt, QueueFullError, StreamError

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def _run(llm, test, max_num_seqs: int = 64, **kwargs) -> None:
    """Run `test(async_engine, engine)` on a fresh engine sharing `llm`'s weights."""
    engine = with_engine(llm, num_kv_blocks=128, max_num_seqs=max_num_seqs).engine

    async def main() -> None:
        async_engine = AsyncEngine(engine, **kwargs)
        async_engine.start()
        try:
            await asyncio.wait_for(test(async_engine, engine), timeout=120)
        finally:
            async_engine.stop()
        assert not async_engine.is_alive

    asyncio.run(main())


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_outputs_match_llm_generate_and_blocks_are_freed(llm):
    expected = llm.generate("The capital of France is", GREEDY)[0].outputs[0].text

    async def test(async_engine, engine) -> None:
        stream = await async_engine.add(["a"], ["The capital of France is"], GREEDY)
        items = await _collect(stream)
        assert items[-1].finished and items[-1].outputs[0].text == expected
        assert "".join(i.outputs[0].delta_text for i in items) == expected
        until_eos = SamplingParams(temperature=0.0)  # max_tokens: the room left (chat default)
        chat = await async_engine.add(
            ["b"], [ChatPrompt([{"role": "user", "content": "Say hi."}])], until_eos, True
        )
        final = (await _collect(chat))[-1]
        assert final.finished and final.outputs[0].finish_reason == "stop"
        await asyncio.sleep(0.1)
        assert engine.kv_cache.num_used_blocks == 0 and async_engine.stats.num_unfinished == 0

    _run(llm, test)


def test_bad_adds_raise_and_leave_the_engine_unchanged(llm):
    async def test(async_engine, engine) -> None:
        with pytest.raises(ValueError, match="prompt is empty"):
            await async_engine.add(["a", "b"], ["fine", ""], GREEDY)
        too_long = SamplingParams(max_tokens=10**6)
        with pytest.raises(ValueError, match="max_tokens"):
            await async_engine.add(["c"], ["Hello"], too_long)
        assert not engine.has_unfinished_requests()

    _run(llm, test)


def test_abort_ends_the_stream_with_abort(llm):
    async def test(async_engine, engine) -> None:
        params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        stream = await async_engine.add(["a"], ["Once upon a time"], params)
        items = []
        async for item in stream:
            items.append(item)
            if len(items) == 3:
                async_engine.abort(["a"])
        assert items[-1].finished and items[-1].outputs[0].finish_reason == "abort"
        assert len(items[-1].outputs[0].token_ids) < 500
        # The abort's final output carries the whole output, which the deltas add up to.
        streamed = [t for item in items for t in item.outputs[0].delta_token_ids]
        assert items[-1].outputs[0].token_ids == streamed and len(streamed) >= 3
        await asyncio.sleep(0.1)
        assert engine.kv_cache.num_used_blocks == 0

    _run(llm, test)


def test_queue_bound(llm):
    async def test(async_engine, engine) -> None:
        long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        await async_engine.add(["a"], ["Hello"], long)  # runs (max_num_seqs=1) or waits
        await async_engine.add(["b"], ["Hello"], long)  # waits
        with pytest.raises(QueueFullError):
            await async_engine.add(["c", "d"], ["Hello", "Hi"], long)
        async_engine.abort(["a", "b"])

    _run(llm, test, max_num_seqs=1, max_waiting=2)


def test_a_failing_step_fails_the_running_requests_and_serving_goes_on(llm):
    async def test(async_engine, engine) -> None:
        real_step = engine.step
        calls = []

        def flaky_step():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected fault")
            return real_step()

        engine.step = flaky_step
        items = await _collect(await async_engine.add(["a"], ["Hello there"], GREEDY))
        assert isinstance(items[-1], StreamError) and "injected fault" in items[-1].message
        assert engine.kv_cache.num_used_blocks == 0
        items = await _collect(await async_engine.add(["b"], ["Hello there"], GREEDY))
        assert items[-1].finished and len(items[-1].outputs[0].token_ids) == 5

    _run(llm, test)
