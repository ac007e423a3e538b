"""Results returned to users, with vLLM's names (`RequestOutput`, `CompletionOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of a request. `delta_*` hold what is new since the previous increment."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    forced_logprobs: list[float] | None = None  # replay: log-prob of each forced token

    @property
    def finished(self) -> bool:
        """True when this sample has a finish reason ("stop", "length" or "abort")."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timings of one request, in seconds (monotonic clock)."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds per generated token after the first (None with fewer than 2 tokens)."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        if self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class RequestOutput:
    """Everything a request has produced so far (`finished` once all samples ended)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
