"""An HTTP/1.1 protocol for uvicorn that does not let a connection sit without a request.

uvicorn's `timeout_keep_alive` runs only after a response and is cancelled by any byte
received, so a client that opens connections and never completes a request (no bytes, or
headers sent one byte at a time) holds them forever: a few thousand exhaust the file
descriptors and `/health` stops answering. `guarded_h11(seconds)` is uvicorn's h11 protocol
with one more timer, armed when the connection opens and again after every response: if no
request is in flight when it fires, the connection is closed. A request in flight (a long
stream included) is never cut by it.
"""

from __future__ import annotations

import asyncio
from typing import Any


def guarded_h11(request_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's H11Protocol closing connections idle or mid-headers for `request_timeout_s`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if request_timeout_s <= 0:
        raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")

    class GuardedH11Protocol(H11Protocol):
        _guard: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._guard is not None:
                self._guard.cancel()
            self._guard = self.loop.call_later(request_timeout_s, self._expire)

        def _expire(self) -> None:
            in_flight = self.cycle is not None and not self.cycle.response_complete
            if not in_flight and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._guard is not None:
                self._guard.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol
