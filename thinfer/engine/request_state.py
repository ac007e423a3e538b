"""One request's engine-side state: its samples, its metrics, and how its outputs are built.

Outputs carry what is new since the previous output of the request (delta text, token ids and
logprobs), and the full lists once, on the final output (`RequestOutputKind.DELTA`), or on
every output (`RequestOutputKind.CUMULATIVE`). Building a DELTA output costs O(what is new),
so a long stream costs O(1) per step, not O(tokens so far).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from thinfer.engine.sequence import Sequence, SequenceStatus
from thinfer.outputs import CompletionOutput, RequestMetrics, RequestOutput, RequestOutputKind


@dataclass
class RequestState:
    """A request inside the engine. `emitted[i]` = (chars, tokens) of sample i already sent."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics
    emitted: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None  # why the engine failed this request alone (see RequestOutput)

    def __post_init__(self) -> None:
        self.emitted = [(0, 0)] * len(self.seqs)

    @property
    def finished(self) -> bool:
        """True once every sample has a finish reason."""
        return all(seq.finish_reason is not None for seq in self.seqs)

    def device_kv_slots(self) -> int:
        """KV slots the request's samples hold on the device now (running samples only)."""
        return sum(seq.kv_len for seq in self.seqs if seq.status is SequenceStatus.RUNNING)

    def record_peak_kv(self, seq: Sequence) -> None:
        """Update the peaks; call right after the model wrote `seq`'s tokens of this step."""
        peaks = self.metrics.sample_peak_kv_slots
        peaks[seq.index] = max(peaks[seq.index], seq.kv_len)
        self.metrics.peak_kv_slots = max(self.metrics.peak_kv_slots, self.device_kv_slots())

    def make_output(self, now: float) -> RequestOutput:
        """The output of this step: deltas since the previous one, full lists when final."""
        finished = self.finished
        full = finished or self.seqs[0].params.output_kind is RequestOutputKind.CUMULATIVE
        outputs = [self._completion(i, seq, full) for i, seq in enumerate(self.seqs)]
        metrics = self.metrics
        firsts = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        metrics.first_token_time = min(firsts) if firsts else None
        metrics.num_generated_tokens = max(len(s.output_token_ids) for s in self.seqs)
        metrics.kv_slots = self.device_kv_slots()
        if finished:
            metrics.finished_time = now
        snapshot = dataclasses.replace(
            metrics, sample_peak_kv_slots=list(metrics.sample_peak_kv_slots)
        )
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outputs,
            finished,
            snapshot,
            self.error,
        )

    def _completion(self, i: int, seq: Sequence, full: bool) -> CompletionOutput:
        done = seq.finish_reason is not None
        holdback = 0 if done or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        visible = max(0, len(seq.text) - holdback)
        chars, tokens = self.emitted[i]
        self.emitted[i] = (max(chars, visible), len(seq.output_token_ids))
        logprobs = seq.logprobs
        forced = seq.params.forced_tokens
        return CompletionOutput(
            index=seq.index,
            text=seq.text[:visible] if full else "",
            token_ids=list(seq.output_token_ids) if full else [],
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(logprobs) if full and logprobs is not None else None,
            cumulative_logprob=seq.cumulative_logprob if logprobs is not None else None,
            delta_text=seq.text[chars:visible] if visible > chars else "",
            delta_token_ids=seq.output_token_ids[tokens:],
            forced_logprobs=list(seq.forced_logprobs) if full and forced else None,
            delta_logprobs=logprobs[tokens:] if logprobs is not None else None,
        )
