"""One generated sample's state: tokens, progress through the model, and its KV slots.

Invariants:
- `num_computed_tokens` counts tokens already fed through the model; the next token fed has
  absolute position `num_computed_tokens` (RoPE position), whatever the cache holds.
- `kv_len` counts the KV slots the sequence occupies. Without compression it equals
  `num_computed_tokens`; once entries are evicted it is smaller. Blocks are allocated for
  `kv_len` slots, never for the token count.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from thinfer.engine.compression import SequenceCompression

from thinfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One sample of one request."""

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    kv_len: int = 0
    block_table: list[int] = field(default_factory=list)
    swapped_kv: torch.Tensor | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    first_token_time: float | None = None
    finished_time: float | None = None
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0
    compression: SequenceCompression | None = None  # set by the compression stage
    forced_logprobs: list[float] = field(default_factory=list)  # of params.forced_tokens

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int | None = None) -> list[int]:
        """Tokens [start, stop) of prompt + output, without concatenating the whole history."""
        split = len(self.prompt_token_ids)
        stop = self.num_tokens if stop is None else stop
        if start >= split:
            return self.output_token_ids[start - split : stop - split]
        if stop <= split:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - split]

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated token count."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet fed through the model (a prompt chunk, or the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """True once a stop condition ended the sequence or it was aborted."""
        return self.status is SequenceStatus.FINISHED
