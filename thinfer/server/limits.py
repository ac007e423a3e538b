"""`ServerLimits`: the bounds one server puts on queued work and on each request's lifetime.

- `max_waiting`: requests waiting for a batch slot (beyond it an add gets 429).
- `max_waiting_tokens`: prompt tokens of the requests waiting (beyond it: 429), so a few
  huge prompts cannot queue an hour of prefill behind the running streams.
- `request_timeout_s`: a request still running this long after it arrived is aborted (its
  stream ends with finish_reason "abort").
- `default_max_tokens`: the cap of a chat request that sets no max (None: the room left in
  the context, as OpenAI's API does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from thinfer.server.request_stream import QueueFullError


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """See the module docstring; None disables a bound."""

    max_waiting: int | None = 1024
    max_waiting_tokens: int | None = None
    request_timeout_s: float | None = None
    default_max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_waiting",
            "max_waiting_tokens",
            "request_timeout_s",
            "default_max_tokens",
        ):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")

    def check_admission(
        self, waiting_requests: int, waiting_tokens: int, new_prompt_lens: list[int]
    ) -> None:
        """Raise QueueFullError (HTTP 429) if adding these prompts would pass a bound."""
        if (
            self.max_waiting is not None
            and waiting_requests + len(new_prompt_lens) > self.max_waiting
        ):
            raise QueueFullError(
                f"too many requests waiting ({waiting_requests}, bound {self.max_waiting})"
            )
        tokens = waiting_tokens + sum(new_prompt_lens)
        if self.max_waiting_tokens is not None and tokens > self.max_waiting_tokens:
            raise QueueFullError(
                f"too many prompt tokens waiting ({waiting_tokens} + {sum(new_prompt_lens)}, "
                f"bound {self.max_waiting_tokens})"
            )

    def expired(self, arrivals: Iterable[tuple[str, float]], now: float) -> list[str]:
        """Ids of the requests (id, arrival time) that ran past `request_timeout_s`."""
        if self.request_timeout_s is None:
            return []
        return [rid for rid, arrival in arrivals if now - arrival > self.request_timeout_s]
