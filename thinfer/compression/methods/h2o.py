"""H2O (heavy-hitter oracle): per layer and KV head, the slots that received the most
attention from every query so far, plus the recent window; every step once the cache is full.

The engine's compression stage accumulates the attention column sums of each step into the
per-slot value "attention" (summed over each KV head's query heads; with shared scoring, the
mean over layers and heads). Native schedule: recent N = `window` (default half the budget),
B - 1 - N heavy hitters, so the cache holds B once the new token is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinfer.compression.method import Method, ScoreContext, Signals, register


@register
@dataclass(frozen=True)
class H2O(Method):
    """Score: accumulated attention received."""

    name = "h2o"
    pointwise = True
    per_head = True
    slot_values = ("attention",)

    def signals(self) -> Signals:
        return Signals(column_sums=True)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.values["attention"][..., : ctx.num_old]
