"""StreamingLLM: the first `sink_tokens` attention sinks plus the most recent tokens.

With `reassign_positions`, attention sees positions *within the cache* as StreamingLLM
defines them. RoPE scores depend only on the query-key distance, and the kept tail is the
contiguous run of the latest tokens, so its absolute distances already equal the in-cache
ones; only the sinks are too far away. After each compaction the engine's compression stage
re-rotates the sinks forward by the number of evicted tokens (`sinks_to_rotate`), always from
a pristine copy of their original keys (so rounding never accumulates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thinfer.compression.method import (
    Method,
    RuleContext,
    ScoreContext,
    check_range,
    check_type,
    register,
)

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


@register
@dataclass(frozen=True)
class StreamingLLM(Method):
    """Sinks + recent tokens, every step once full. Score: sinks first (earliest first),
    then recency."""

    name = "streamingllm"
    pointwise = True
    sink_tokens: int = 4
    reassign_positions: bool = False

    def check(self, config: CompressionConfig) -> None:
        check_type("sink_tokens", self.sink_tokens, (int,))
        check_type("reassign_positions", self.reassign_positions, (bool,))
        assert config.budget is not None
        check_range("sink_tokens", self.sink_tokens, 0 <= self.sink_tokens < config.budget)
        if self.reassign_positions and config.trigger != "native":
            raise ValueError(
                "kv_compression.reassign_positions needs the native trigger (the kept tail "
                "must be the latest tokens for in-cache positions to hold)"
            )

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        assert config.budget is not None
        if ctx.kv_len < config.budget:
            return None
        return config.budget - 1 - self.sink_tokens, self.sink_tokens

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        positions = ctx.positions[..., : ctx.num_old].double()
        # Scores rank by position, so the sinks' bonus must exceed every position, not the
        # cache length: with `kv_len` the sinks lost to tokens past ~3x the budget.
        span = ctx.positions.amax().double() + 1
        sinks = positions < self.sink_tokens
        return torch.where(sinks, 2.0 * span + (span - positions), positions)

    @property
    def sinks_to_rotate(self) -> int:
        """Sink slots whose keys the stage re-rotates after each compaction (0: none)."""
        return self.sink_tokens if self.reassign_positions else 0
