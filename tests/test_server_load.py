"""The server under load, client disconnects, its queue bound (429) and SIGTERM.

Each test group runs its own `thinfer serve` subprocess on loopback.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from server_utils import ServerProcess, wait_until_idle

MODEL = "smollm2-load"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Write a short poem about the autumn wind.",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
    "Rain",
    "Dear diary, today I finally climbed the hill behind our house. From the top I could see",
]
METHODS = [
    None,
    {"method": "window", "budget": 16},
    {"method": "streamingllm", "budget": 24},
    {"method": "h2o", "budget": 24},
    {"method": "snapkv", "budget": 24, "interval": 8, "observation_window": 4},
]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--served-model-name", MODEL, "--num-kv-blocks", "512")
    yield proc
    proc.stop()


def _completion_body(max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": MODEL,
        "prompt": PROMPTS[1],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _one_stream(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str, str]:
    max_tokens = 4 + (i * 7) % 37  # 4..40
    extra = {"ignore_eos": True}
    if METHODS[i % len(METHODS)] is not None:
        extra["kv_compression"] = METHODS[i % len(METHODS)]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return max_tokens, usage.completion_tokens, finish, "".join(text)


def test_64_concurrent_streams_with_mixed_compression(server):
    async def run() -> list[tuple[int, int, str, str]]:
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300
        )
        async with client:
            return await asyncio.wait_for(
                asyncio.gather(*(_one_stream(client, i) for i in range(64))), timeout=300
            )

    started = time.monotonic()
    results = asyncio.run(run())
    assert len(results) == 64
    for max_tokens, completion_tokens, finish, text in results:
        assert finish == "length" and completion_tokens == max_tokens
        assert text
    m = wait_until_idle(server.url)
    assert m["thinfer:kv_blocks_in_use"] == 0 and m["vllm:num_requests_running"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
    assert time.monotonic() - started < 300


def test_disconnect_mid_stream_frees_the_request(server):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=_completion_body(1500)) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                if chunks >= 3:
                    break
        # Leaving the block closes the connection mid-stream.
    m = wait_until_idle(server.url, timeout=30)
    assert m["vllm:num_requests_running"] == 0 and m["thinfer:kv_blocks_in_use"] == 0
    assert m["vllm:request_success_total"] >= 1  # the aborted request was counted


def test_full_queue_gets_429_with_retry_after():
    proc = ServerProcess(
        "--num-kv-blocks", "256", "--max-num-seqs", "1", "--max-waiting-requests", "1"
    )
    statuses: list[tuple[int, str | None, str]] = []
    lock = threading.Lock()
    all_answered = threading.Barrier(5, timeout=60)

    def one() -> None:
        with httpx.Client(timeout=60) as http:
            body = {**_completion_body(400), "model": None}
            with http.stream("POST", f"{proc.url}/v1/completions", json=body) as r:
                error_type = json.loads(r.read())["error"]["type"] if r.status_code == 429 else ""
                with lock:
                    statuses.append((r.status_code, r.headers.get("retry-after"), error_type))
                all_answered.wait()  # accepted streams stay open until every request is answered

    try:
        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        rejected = [s for s in statuses if s[0] == 429]
        assert len(statuses) == 5 and rejected, statuses
        assert all(retry is not None and int(retry) >= 1 for _, retry, _ in rejected)
        assert all(kind == "rate_limit_error" for _, _, kind in rejected)
        assert all(code in (200, 429) for code, _, _ in statuses)
        assert wait_until_idle(proc.url, timeout=30)["thinfer:kv_blocks_in_use"] == 0
    finally:
        proc.stop()


def test_sigterm_ends_streams_with_a_final_chunk_and_exits_0():
    proc = ServerProcess("--num-kv-blocks", "256", "--shutdown-grace", "1")
    lines: list[str] = []
    started = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.Client(timeout=120) as http:
                body = {**_completion_body(1900), "model": None}
                with http.stream("POST", f"{proc.url}/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line[len("data: ") :])
                            if len(lines) >= 3:
                                started.set()
        except BaseException as e:  # a broken connection fails the test below
            errors.append(e)
        finally:
            started.set()

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(timeout=120)
        proc.terminate()
        reader.join(timeout=60)
        assert not reader.is_alive() and not errors, errors
        assert proc.proc.wait(timeout=60) == 0, proc.output()
        assert lines[-1] == "[DONE]"
        final = json.loads(lines[-2])["choices"][0]
        assert final["finish_reason"] in ("abort", "length")
    finally:
        proc.stop()


def test_sigterm_during_a_long_step_still_ends_streams_and_exits_soon():
    """SIGTERM lands while a long prefill step runs: shutdown must drain the engine's live
    requests (not a stale snapshot), so the stream still gets its final chunk, and the
    process exits without waiting out its timeouts."""
    proc = ServerProcess("--num-kv-blocks", "512", "--shutdown-grace", "0")
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=120) as http:
            body = {**_completion_body(1000), "model": None}
            with http.stream("POST", f"{proc.url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[len("data: ") :])
                        started.set()

    def long_prompt() -> None:
        body = {"prompt": [5] * 1900, "max_tokens": 2, "temperature": 0}
        try:
            httpx.post(f"{proc.url}/v1/completions", json=body, timeout=120)
        except httpx.TransportError:
            pass  # cut by the shutdown: fine, it is not the stream under test

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(timeout=120)
        threading.Thread(target=long_prompt, daemon=True).start()
        time.sleep(0.5)  # its prefill (~1900 tokens in one step) is running
        stopped_at = time.monotonic()
        proc.terminate()
        reader.join(timeout=60)
        assert proc.proc.wait(timeout=60) == 0, proc.output()
        # it waits for the long step to end, then exits; loaded CI machines are slow, and the
        # stale-snapshot wait this guards against is checked exactly in test_server_limits.py
        assert time.monotonic() - stopped_at < 45
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "abort"
    finally:
        proc.stop()
