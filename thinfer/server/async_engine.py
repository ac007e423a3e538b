"""`AsyncEngine`: one thread owns the synchronous `LLMEngine`; asyncio handlers talk to it.

The engine is torch code and not thread-safe, so exactly one thread ever touches it. Handlers
post commands (add, abort) to a queue under a `threading.Condition`; the engine thread drains
the commands between steps, then steps while any request is unfinished, and sleeps on the
condition when idle (no busy loop). Each step's outputs go back to the event loop in one
`loop.call_soon_threadsafe` call, onto the `asyncio.Queue` of the HTTP request they belong to.

An add is answered through a `concurrent.futures.Future`: its ValueError (bad prompt, prompt
that can never fit) comes back to the handler, and the engine is left unchanged. An abort
frees the request's KV blocks at once and ends its stream with a final output whose
finish_reason is "abort". If a step raises, the requests that were running are failed with a
`StreamError` and aborted, the error is logged, and the engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from thinfer.engine.llm_engine import LLMEngine
from thinfer.outputs import RequestOutput
from thinfer.sampling_params import SamplingParams
from thinfer.server.admission import admit, tokenize
from thinfer.server.limits import ServerLimits
from thinfer.server.request_stream import (
    AddCommand,
    EngineStats,
    Prompt,
    RequestStream,
    ShuttingDownError,
    StreamError,
    Tracked,
    aborted_output,
    deliver,
    engine_stats,
)

logger = logging.getLogger("thinfer.server")
# How long shutdown waits for the step running now to end so that its aborts land.
ABORT_WAIT_S = 30.0


class AsyncEngine:
    """Runs `engine` in a background thread; `add` and `abort` are safe from the event loop.

    `limits` (`ServerLimits`) bound the waiting requests and their prompt tokens (an add
    beyond them raises QueueFullError), each request's lifetime and a chat's default max;
    `max_waiting` alone is the short form. `on_output(output, first)` is called in the engine
    thread for every output; `first` is True on the first output that carries a token.
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int | None = None,
        on_output: Callable[[RequestOutput, bool], None] | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits(max_waiting=max_waiting)
        self.on_output = on_output
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._commands: deque[AddCommand | list[str] | str] = deque()
        self._tracked: dict[str, Tracked] = {}
        self._accepting = True
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # monotonic start of the step running now
        self._publish_stats()

    # ----- lifecycle (event loop side) ---------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="thinfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def step_running_seconds(self) -> float:
        """How long the engine step running now has run (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve any more (a tensor-parallel rank died), or None."""
        return getattr(self.engine, "failure", None)

    @property
    def accepting(self) -> bool:
        """False once shutdown began."""
        return self._accepting

    async def shutdown(self, grace: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for `grace` seconds, abort the rest.

        Aborted streams end with a final output whose finish_reason is "abort". Reads the
        engine thread's live set of requests, not the stats published after each step (stale
        during a long step), and waits up to `ABORT_WAIT_S` for the step running now to end so
        that the aborts land. Idempotent.
        """
        self._accepting = False
        await self._drain(grace)
        if self._tracked:
            logger.info("shutdown: aborting %d unfinished request(s)", len(self._tracked))
            self._post("*")
            await self._drain(ABORT_WAIT_S)

    async def _drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the engine thread to have no request left."""
        deadline = time.monotonic() + seconds
        while self._tracked and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (requests still in it are aborted) and wait for it."""
        self._accepting = False
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----- requests (event loop side) ----------------------------------------------------
    async def add(
        self,
        request_ids: list[str],
        prompts: list[Prompt],
        params: SamplingParams,
        fill_max_tokens: bool = False,
    ) -> RequestStream:
        """Queue one engine request per prompt, all or none; returns their stream.

        Raises ValueError (bad prompt, cannot fit), QueueFullError or ShuttingDownError.
        `fill_max_tokens` replaces `params.max_tokens` by the room the prompt leaves.
        """
        if not (self._accepting and self.is_alive):
            raise ShuttingDownError("the server is shutting down")
        ids = await asyncio.to_thread(lambda: [tokenize(self.engine, p) for p in prompts])
        queue: asyncio.Queue = asyncio.Queue()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(AddCommand(request_ids, ids, params, fill_max_tokens, queue, future))
        stream = RequestStream(request_ids, queue)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(request_ids)  # the client left before the add was answered
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (thread-safe, returns at once; unknown or finished ids are ignored)."""
        self._post(list(request_ids))

    def _post(self, command: AddCommand | list[str] | str) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ----- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        logger.info("engine thread started")
        while True:
            with self._cond:
                while not (self._commands or self._stopping or self._tracked):
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            deliveries: list[tuple[asyncio.Queue, RequestOutput | StreamError]] = []
            for command in commands:
                try:
                    self._apply(command, deliveries)
                except Exception as exc:  # a bug here must not kill the thread
                    logger.exception("engine thread: command failed")
                    if isinstance(command, AddCommand) and not command.future.done():
                        command.future.set_exception(exc)
            try:
                expired = self.limits.expired(
                    ((rid, t.arrival) for rid, t in self._tracked.items()), time.monotonic()
                )
                if stopping or expired:
                    self._abort(list(self._tracked) if stopping else expired, deliveries)
                if not stopping and self._tracked:
                    self._step(deliveries)
            except Exception:  # a bug here must not kill the thread
                logger.exception("engine thread: unexpected error")
            self._publish_stats()
            self._deliver(deliveries)
            if stopping:
                logger.info("engine thread stopped")
                return

    def _apply(
        self, command: AddCommand | list[str] | str, deliveries: list[tuple[asyncio.Queue, object]]
    ) -> None:
        if isinstance(command, AddCommand):
            self._add(command)
        elif command == "*":
            self._abort(list(self._tracked), deliveries)
        else:
            self._abort(command, deliveries)  # type: ignore[arg-type]

    def _add(self, command: AddCommand) -> None:
        engine = self.engine
        if not command.future.set_running_or_notify_cancel():  # the caller gave up
            return
        try:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            running = engine.get_running_request_ids()
            waiting = [t.prompt_token_ids for rid, t in self._tracked.items() if rid not in running]
            prepared = admit(engine, self.limits, sum(map(len, waiting)), command)
        except Exception as exc:  # answered to the handler, which maps it to 4xx/5xx
            command.future.set_exception(exc)
            return
        added: list[str] = []
        try:
            for request_id, (ids, params) in zip(command.request_ids, prepared):
                engine.add_request(ids, params, request_id)
                added.append(request_id)
                tracked = Tracked(command.queue, ids, params, time.monotonic())
                self._tracked[request_id] = tracked
        except Exception as exc:
            for request_id in added:
                engine.abort_request(request_id)
                self._tracked.pop(request_id, None)
            command.future.set_exception(exc)
            return
        command.future.set_result(None)

    def _abort(
        self, request_ids: list[str], deliveries: list[tuple[asyncio.Queue, object]]
    ) -> None:
        now = time.monotonic()
        for request_id in request_ids:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None:
                continue
            out = self.engine.abort_request(request_id) or aborted_output(request_id, tracked, now)
            if self.on_output is not None:
                self.on_output(out, False)
            deliveries.append((tracked.queue, out))

    def _step(self, deliveries: list[tuple[asyncio.Queue, object]]) -> None:
        if not self.engine.has_unfinished_requests():  # never expected: do not spin on them
            self._fail(list(self._tracked), "the engine lost this request", deliveries)
            return
        self._step_started = time.monotonic()  # read live by /health and /metrics
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the running requests")
            running = self.engine.get_running_request_ids()
            failed = [rid for rid in self._tracked if rid in running] or list(self._tracked)
            message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
            self._fail(failed, message, deliveries)
            return
        finally:
            self._step_started = None
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            if out.error is not None:  # failed alone in this step; its batch mates go on
                del self._tracked[out.request_id]
                if self.on_output is not None:
                    self.on_output(out, False)  # counted as an "error" finish
                message = f"the engine failed this request: {out.error}"
                deliveries.append((tracked.queue, StreamError(out.request_id, message)))
                continue
            first = not tracked.got_first_token and out.metrics.first_token_time is not None
            tracked.got_first_token |= first
            if out.finished:
                del self._tracked[out.request_id]
            if self.on_output is not None:
                self.on_output(out, first)
            deliveries.append((tracked.queue, out))

    def _fail(
        self, request_ids: list[str], message: str, deliveries: list[tuple[asyncio.Queue, object]]
    ) -> None:
        for request_id in request_ids:
            tracked = self._tracked.pop(request_id)
            try:
                out = self.engine.abort_request(request_id)
                if out is not None and self.on_output is not None:
                    self.on_output(dataclasses.replace(out, error=message), False)
            except Exception:
                logger.exception("could not abort request %s", request_id)
            deliveries.append((tracked.queue, StreamError(request_id, message)))

    def _publish_stats(self) -> None:
        self.stats = engine_stats(self.engine, len(self._tracked))

    def _deliver(self, deliveries: list[tuple[asyncio.Queue, object]]) -> None:
        if deliveries and self._loop is not None:
            deliver(self._loop, deliveries)
