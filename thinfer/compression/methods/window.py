"""The full cache (no compression) and window attention (the last `budget` tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thinfer.compression.method import Method, RuleContext, ScoreContext, register

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


@register
@dataclass(frozen=True)
class Full(Method):
    """Keep everything."""

    name = "full"

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        return None

    def peak_slots(self, config: CompressionConfig, prompt_len: int, max_tokens: int) -> int:
        return prompt_len + max_tokens


@register
@dataclass(frozen=True)
class Window(Method):
    """Window attention: the new token sees the last `budget` tokens (itself included),
    every step once full. Score (uniform schedule): recency."""

    name = "window"
    pointwise = True

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        assert config.budget is not None
        return (config.budget - 1, 0) if ctx.kv_len >= config.budget else None

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions[..., : ctx.num_old].float()
