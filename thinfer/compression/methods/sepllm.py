"""SepLLM: keep the initial tokens, the separator tokens and a recent window.

Separators summarise the segments they close. As in SepLLM's reference configuration they
are an exact list: the tokens whose text is exactly one of `. , ? ! ; :`, a space, a tab or a
newline (so runs such as "\\n\\n" or " ." are not separators). When the cache hits its cap
(`budget`), the middle (everything between the first `sink_tokens` and the last `window`
tokens) is squeezed to its separators, the most recent `separators` of them, and the cache
grows again up to the cap. Reference values: a=4, s=64..128, w=256, cap 512.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from thinfer.compression.method import (
    Method,
    PrepareContext,
    RuleContext,
    ScoreContext,
    check_range,
    check_type,
    register,
)

if TYPE_CHECKING:
    from thinfer.compression.config import CompressionConfig

SEPARATOR_TEXTS = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")
_SEPARATORS_BY_TOKENIZER: dict[int, frozenset[int]] = {}


def separator_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens whose text is exactly one separator (`SEPARATOR_TEXTS`)."""
    key = id(tokenizer)
    if key not in _SEPARATORS_BY_TOKENIZER:
        found = {
            token_id
            for token_id in range(tokenizer.vocab_size)
            if tokenizer.decode([token_id], skip_special_tokens=True) in SEPARATOR_TEXTS
        }
        _SEPARATORS_BY_TOKENIZER[key] = frozenset(found)
    return _SEPARATORS_BY_TOKENIZER[key]


@register
@dataclass(frozen=True)
class SepLLM(Method):
    """Score: sinks > separators (newer first) > the rest; under the native schedule the
    rest is never kept from the middle."""

    name = "sepllm"
    pointwise = True
    sink_tokens: int = 4
    separators: int | None = None

    def check(self, config: CompressionConfig) -> None:
        check_type("sink_tokens", self.sink_tokens, (int,))
        check_type("separators", self.separators, (int, type(None)))
        budget = config.budget
        assert budget is not None
        check_range("sink_tokens", self.sink_tokens, 0 <= self.sink_tokens < budget)
        if self.separators is not None:
            check_range("separators", self.separators, 0 <= self.separators < budget)

    def prepare(self, context: PrepareContext) -> torch.Tensor:
        if context.tokenizer is None:
            raise ValueError("kv_compression: SepLLM needs a tokenizer to find separator tokens")
        ids = sorted(separator_token_ids(context.tokenizer))
        return torch.tensor(ids, dtype=torch.long)

    def recent(self, config: CompressionConfig) -> int:
        """w: the recent window (default: half the cap)."""
        assert config.budget is not None
        return config.window if config.window is not None else config.budget // 2

    def separator_budget(self, config: CompressionConfig) -> int:
        """s: separators kept from the middle (default: half of what sinks and window leave)."""
        if self.separators is not None:
            return self.separators
        assert config.budget is not None
        return max(0, (config.budget - self.sink_tokens - self.recent(config)) // 2)

    def native_rule(self, config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
        assert config.budget is not None
        if ctx.kv_len < config.budget:
            return None
        recent = min(self.recent(config), ctx.kv_len)
        sinks = min(self.sink_tokens, ctx.kv_len - recent)
        return recent, sinks + self.separator_budget(config)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        positions = ctx.positions[..., : ctx.num_old]
        ids = ctx.token_ids(positions)
        separator = torch.isin(ids, ctx.resources.to(ids.device))
        newer = positions.double()
        span = ctx.positions.amax().double() + 1  # above every position (see StreamingLLM)
        rest = newer if ctx.uniform else torch.full_like(newer, float("-inf"))
        scores = torch.where(separator, span + newer, rest)
        return torch.where(positions < self.sink_tokens, 3.0 * span - newer, scores)
