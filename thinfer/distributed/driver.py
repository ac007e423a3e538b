"""`DriverEngine`: rank 0 of a tensor-parallel engine, the one users and the server call.

Every call that changes engine state is sent to the workers (`thinfer.distributed.worker`)
and then made here: add (after it was validated here, so a bad request reaches no worker),
abort, step. Inside a step the ranks exchange what only the driver decides (sampled tokens,
shared compression decisions; see `RankExchange`). A rank that dies fails the engine for
good: `failure` says why, every later call raises RuntimeError with it, and the server's
/health answers 503. A watchdog thread notices a spawned rank's exit even while the engine
is idle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from thinfer.distributed.groups import RankGroups
from thinfer.engine.llm_engine import LLMEngine
from thinfer.outputs import RequestOutput
from thinfer.sampling_params import SamplingParams

logger = logging.getLogger("thinfer.distributed")
WATCH_INTERVAL_S = 0.2


class DriverEngine(LLMEngine):
    """An `LLMEngine` whose every state change is mirrored by the worker ranks. Built by
    `thinfer.distributed.launch`, which calls `attach` once all ranks are up."""

    groups: RankGroups | None = None
    failure: str | None = None
    _processes: list[mp.Process] = []  # noqa: RUF012 - replaced per engine by `attach`

    def attach(self, groups: RankGroups, processes: list[mp.Process]) -> None:
        """Start driving the workers of `groups`; `processes` are those this process
        spawned (watched; none under torchrun)."""
        self.groups = groups
        self._processes = processes
        self._stopped = threading.Event()
        if processes:
            threading.Thread(target=self._watch, name="thinfer-tp-watchdog", daemon=True).start()

    # ----- mirrored calls ---------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request on every rank; ValueError (no rank changed) on bad input."""
        self._raise_if_failed()
        request_id = super().add_request(prompt, params, request_id)
        try:
            self._send(("add", prompt, params, request_id))
        except RuntimeError:
            super().abort_request(request_id)
            raise
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort on every rank (here alone once the engine failed)."""
        if self.failure is None and request_id in self._requests:
            try:
                self._send(("abort", request_id))
            except RuntimeError:
                pass  # the engine failed; the request still ends here
        return super().abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        """One step on every rank. Any error fails the engine: the ranks may be out of step."""
        self._raise_if_failed()
        self._send(("step",))
        return self._guarded(super().step)

    def kept_positions(self, request_id: str) -> list[torch.Tensor | None]:
        """`LLMEngine.kept_positions` over all ranks: per-head positions joined along the KV
        head dimension (rank order is head order); shared positions, which every rank must
        hold alike (RuntimeError otherwise)."""
        own = [None if p is None else p.cpu() for p in super().kept_positions(request_id)]
        self._send(("positions", request_id))  # after the KeyError of an unknown id, if any
        ranks = self._guarded(lambda: self.groups.gather_objects(own))  # type: ignore[union-attr]
        merged: list[torch.Tensor | None] = []
        for sample, own in enumerate(ranks[0]):
            parts = [positions[sample] for positions in ranks]
            if own is None or own.dim() > 1:
                merged.append(None if own is None else torch.cat(parts, dim=1))
            elif any(not torch.equal(own, part) for part in parts):
                raise RuntimeError(f"ranks keep different slots for request {request_id!r}")
            else:
                merged.append(own)
        return merged

    def rank_memory_bytes(self) -> list[dict[str, int]]:
        """`memory_bytes()` of every rank, in rank order."""
        self._send(("memory",))
        return self._guarded(lambda: self.groups.gather_objects(self.memory_bytes()))  # type: ignore[union-attr]

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers and wait for the spawned ones to exit. Idempotent."""
        if self.groups is None:
            return
        self._stopped.set()
        if self.failure is None:
            try:
                self._send(("stop",))
            except RuntimeError:
                pass
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.terminate()
                process.join(timeout)
        self.groups = None

    # ----- failure ------------------------------------------------------------------------
    def _send(self, command: tuple[Any, ...]) -> None:
        self._guarded(lambda: self.groups.broadcast_object(command))  # type: ignore[union-attr]

    def _guarded(self, call: Callable[[], Any]) -> Any:
        if self.groups is None:
            raise RuntimeError("the tensor-parallel engine was closed")
        try:
            return call()
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise RuntimeError(self.failure) from exc

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _fail(self, why: str) -> None:
        if self.failure is None:
            dead = [
                f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                for rank, p in enumerate(self._processes, start=1)
                if not p.is_alive()
            ]
            detail = "; ".join(dead) or why
            self.failure = f"tensor-parallel engine failed: {detail}; it must be restarted"
            logger.error("%s", self.failure)

    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            if any(not p.is_alive() for p in self._processes):
                self._fail("a rank exited")
                return
