"""DynTS at inference: keep the decision-critical thinking tokens by predicted importance.

Every cached slot carries the predictor's score, given when its token is fed in (the engine's
compression stage runs one predictor call for all DynTS rows of a step). Prompt tokens, the
think-end marker and every answer token after it are never evicted. When the cache reaches the
budget B: keep the last W slots and, of the older ones, the top floor(r * (L - W)) by score (at
least every protected one), the same slots in every layer and head. Memory then grows back to
B: a saw-tooth between about r*(B-W)+W and B. W defaults to 2/5 of B (the paper's B=5000,
W=2000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from thinfer.compression.method import (
    Method,
    PrepareContext,
    RuleContext,
    ScoreContext,
    Signals,
    check_type,
    register,
)
from thinfer.compression.predictor import load_predictor

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig


@register
@dataclass(frozen=True)
class DynTS(Method):
    """Score: the importance head's prediction from each token's final hidden state."""

    name = "dynts"
    pointwise = True
    protects_prompt = True
    slot_values = ("predicted",)
    predictor: str | None = None
    think_end_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.think_end_token_ids, list):
            object.__setattr__(self, "think_end_token_ids", tuple(self.think_end_token_ids))

    def check(self, config: CompressionConfig) -> None:
        check_type("predictor", self.predictor, (str, type(None)))
        if not self.predictor:
            raise ValueError("kv_compression.predictor: DynTS needs the path of a predictor head")
        ids = self.think_end_token_ids
        if ids is not None and (
            not isinstance(ids, tuple)
            or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise ValueError("kv_compression.think_end_token_ids must be non-negative ints")

    def signals(self) -> Signals:
        return Signals(hidden_states=True)

    def prepare(self, context: PrepareContext) -> Any:
        """Load the head (cached per path) and check it fits the model."""
        assert self.predictor is not None
        try:
            predictor = load_predictor(self.predictor, context.dtype, str(context.device))
        except ValueError as e:
            raise ValueError(f"kv_compression.predictor: {e}") from e
        if predictor.hidden_size != context.hidden_size:
            raise ValueError(
                f"kv_compression.predictor: the DynTS head expects hidden size "
                f"{predictor.hidden_size}, the model has {context.hidden_size}"
            )
        return predictor

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        assert config.budget is not None
        if ctx.kv_len < config.budget:
            return None
        window = min(config.recent_window, ctx.kv_len)
        return window, math.floor(config.ratio * (ctx.kv_len - window))

    def peak_slots(self, config: CompressionConfig, prompt_len: int, max_tokens: int) -> int:
        """The prompt is never evicted and the W most recent tokens always stay, so the cache
        can sit at prompt + W + 1 even when that exceeds B. Answer tokens are never evicted
        either, and an answer's length is unknown: with a think-end marker configured,
        admission counts the full length (memory is still freed while the request runs)."""
        full = prompt_len + max_tokens
        if self.think_end_token_ids:
            return full
        assert config.budget is not None
        return min(full, max(config.budget, prompt_len + config.recent_window + 1))

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.values["predicted"][..., : ctx.num_old]

    def score_hidden(self, resources: Any, hidden: torch.Tensor) -> torch.Tensor:
        return resources(hidden).float()

    def batch_key(self) -> Any:
        return self.predictor

    def answer_start(self, output_tokens: list[int], checked: int) -> int | None:
        marker = self.think_end_token_ids
        if not marker:
            return None
        size = len(marker)
        for start in range(max(0, checked - size + 1), len(output_tokens) - size + 1):
            if tuple(output_tokens[start : start + size]) == marker:
                return start
        return None
