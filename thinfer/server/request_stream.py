"""What travels between the engine thread and the HTTP handlers: prompts, outputs, errors.

`RequestStream` is what a handler reads: the outputs of the engine requests of one HTTP
request (one per prompt), ending when all finished, or at the first `StreamError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from thinfer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from thinfer.engine.llm_engine import LLMEngine


class QueueFullError(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


class ShuttingDownError(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the chat template in the engine thread."""

    messages: list[dict[str, str]]


Prompt = str | list[int] | ChatPrompt


@dataclass(frozen=True)
class StreamError:
    """The engine failed while running this request (a server fault: HTTP 500 style)."""

    request_id: str
    message: str


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state, published by the engine thread for /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    num_unfinished: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    preemptions_total: int = 0
    step_running_seconds: float = 0.0  # read live at scrape time, not published per step


@dataclass
class AddCommand:
    """Add one engine request per prompt, all or none; answered through `future`."""

    request_ids: list[str]
    prompt_token_ids: list[list[int]]  # tokenized by the handler, off the engine thread
    params: SamplingParams
    fill_max_tokens: bool
    queue: asyncio.Queue
    future: concurrent.futures.Future


@dataclass
class Tracked:
    """The engine thread's record of a request it runs: where its outputs go."""

    queue: asyncio.Queue
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    got_first_token: bool = False


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt), in order."""

    def __init__(self, request_ids: list[str], queue: asyncio.Queue) -> None:
        self.request_ids = request_ids
        self._queue = queue

    async def __aiter__(self) -> AsyncIterator[RequestOutput | StreamError]:
        """Yield outputs until every request finished, or one StreamError (then stop)."""
        pending = set(self.request_ids)
        while pending:
            item = await self._queue.get()
            yield item
            if isinstance(item, StreamError):
                return
            if item.finished:
                pending.discard(item.request_id)


def aborted_output(request_id: str, tracked: Tracked, now: float) -> RequestOutput:
    """A final "abort" output for a request the engine no longer knows (nothing generated
    is known here; an abort the engine answers carries what the request had)."""
    completions = [
        CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort")
        for i in range(tracked.params.n)
    ]
    metrics = RequestMetrics(arrival_time=tracked.arrival, finished_time=now)
    return RequestOutput(request_id, None, tracked.prompt_token_ids, completions, True, metrics)


def engine_stats(engine: LLMEngine, num_unfinished: int) -> EngineStats:
    """A snapshot of `engine` (call in the engine thread)."""
    return EngineStats(
        num_running=engine.get_num_running_requests(),
        num_waiting=engine.get_num_waiting_requests(),
        num_unfinished=num_unfinished,
        kv_blocks_used=engine.kv_cache.num_used_blocks,
        kv_blocks_total=engine.kv_cache.num_usable_blocks,
        prompt_tokens_total=engine.num_prompt_tokens_total,
        generation_tokens_total=engine.num_generated_tokens_total,
        preemptions_total=engine.num_preemptions,
    )


def deliver(
    loop: asyncio.AbstractEventLoop, deliveries: list[tuple[asyncio.Queue, object]]
) -> None:
    """Put each (queue, item) on its queue from another thread, in one loop callback (a closed
    loop means nobody listens any more: dropped)."""

    def put_all() -> None:
        for queue, item in deliveries:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:
        pass
