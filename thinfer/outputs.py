"""Results returned to users, with vLLM's names (`RequestOutput`, `CompletionOutput`).

Outputs of a request come in increments (`LLMEngine.step`, `LLM.stream`). With the default
`RequestOutputKind.DELTA`, an intermediate output carries only what is new since the previous
one (`delta_text`, `delta_token_ids`, `delta_logprobs`), so a long stream costs O(1) per step;
the final output (`RequestOutput.finished`) carries its own delta *and* the full `text`,
`token_ids`, `logprobs` and `forced_logprobs` once. `RequestOutputKind.CUMULATIVE` puts the full
lists on every output (copied each step: quadratic over a long stream).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestOutputKind(enum.Enum):
    """What the outputs of a request carry (set per request in `SamplingParams.output_kind`)."""

    DELTA = "delta"  # intermediate outputs: deltas only; the final one: deltas + full lists
    CUMULATIVE = "cumulative"  # every output: deltas + full lists so far


@dataclass
class CompletionOutput:
    """One sample of a request.

    `delta_text`, `delta_token_ids` and `delta_logprobs` hold what is new since the previous
    output of this request; concatenated over all outputs they equal the final `text`,
    `token_ids` and `logprobs`. The full fields (`text`, `token_ids`, `logprobs`,
    `forced_logprobs`) are filled on the request's final output (and on every output of a
    `RequestOutputKind.CUMULATIVE` request); on intermediate `DELTA` outputs they are empty
    ("", [], None). `delta_logprobs` and `logprobs` are None when no logprobs were asked.
    Text that could still become a stop string is held back from the deltas until it cannot.
    `cumulative_logprob` is always current.
    """

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
    delta_logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        """True when this sample has a finish reason ("stop", "length" or "abort")."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timings (seconds, monotonic clock) and KV-cache occupancy of one request.

    KV figures count slots: one slot holds one token's keys and values in every layer
    (`kv_bytes_per_slot` bytes). A request's figure is the sum over its samples.
    `kv_slots` is what the request holds now (after this step's eviction; 0 once finished).
    `peak_kv_slots` is the most it held at any time, measured right after each model step
    wrote its new tokens and before any eviction, so the token being written counts: a
    window of budget B peaks at B, a full cache at prompt + generated tokens - 1 (the last
    sampled token is never written). `sample_peak_kv_slots[i]` is sample i's own peak, by the
    same definition; the request's peak is at most their sum (samples may peak at different
    times; preempted samples hold no device slots).
    """

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    kv_slots: int = 0
    peak_kv_slots: int = 0
    sample_peak_kv_slots: list[int] = field(default_factory=list)
    kv_bytes_per_slot: int = 0

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache the request holds now (`kv_slots` x bytes per slot)."""
        return self.kv_slots * self.kv_bytes_per_slot

    @property
    def peak_kv_bytes(self) -> int:
        """The most bytes of KV cache the request held at any time."""
        return self.peak_kv_slots * self.kv_bytes_per_slot

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
    """One increment of a request (`finished` once all samples ended; see the module doc).

    `metrics` is a snapshot taken when this output was made. `error` is set (and the
    unfinished samples end with finish_reason "error") when the engine failed this request
    alone during a step, e.g. its sampling row raised; its batch mates go on.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
