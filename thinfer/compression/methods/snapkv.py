"""SnapKV at decode time: per KV head, the slots the last `observation_window` queries attend
to most (averaged over the window and the head's query group, max-pooled), plus that window;
every `interval` generated tokens once the cache holds `budget` slots (native schedule, so
the cache stays <= budget + interval - 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thinfer.compression.head_scores import snapkv_scores
from thinfer.compression.method import (
    Method,
    RuleContext,
    ScoreContext,
    Signals,
    check_range,
    check_type,
    register,
)

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


@register
@dataclass(frozen=True)
class SnapKV(Method):
    """Score: pooled window attention, per layer and KV head."""

    name = "snapkv"
    per_head = True
    observation_window: int = 8
    pool_kernel: int = 7
    interval: int = 128

    def signals(self) -> Signals:
        return Signals(query_window=self.observation_window, keys=True)

    def check(self, config: CompressionConfig) -> None:
        budget = config.budget
        assert budget is not None
        for name in ("observation_window", "pool_kernel", "interval"):
            check_type(name, getattr(self, name), (int,))
        check_range("interval", self.interval, self.interval >= 1)
        window = self.observation_window
        check_range("observation_window", window, 1 <= window < budget)
        kernel = self.pool_kernel
        check_range("pool_kernel", kernel, 0 < kernel <= budget and kernel % 2 == 1)

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        budget = config.budget
        assert budget is not None
        if ctx.kv_len < budget or ctx.num_generated % self.interval:
            return None
        recent = min(self.observation_window, ctx.kv_len)
        return recent, budget - 1 - recent

    def peak_slots(self, config: CompressionConfig, prompt_len: int, max_tokens: int) -> int:
        if config.trigger == "uniform":
            return super().peak_slots(config, prompt_len, max_tokens)
        assert config.budget is not None
        bound = max(prompt_len, config.budget) + self.interval - 1
        return min(prompt_len + max_tokens, bound)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        assert ctx.keys is not None and ctx.queries is not None
        return torch.stack(
            [
                self.layer_scores(ctx.queries[i], ctx.keys(i), ctx.num_old)
                for i in range(ctx.num_layers)
            ]
        )

    def layer_scores(self, queries: torch.Tensor, keys: torch.Tensor, num_old: int) -> torch.Tensor:
        """Scores [Hkv, num_old] of one layer (keys [n, Hkv, D] in position order)."""
        return snapkv_scores(queries.to(keys.device), keys, num_old, self.pool_kernel)
