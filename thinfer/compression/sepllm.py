"""SepLLM: keep the initial tokens, the separator tokens and a recent window.

Separators (`. , ? ! ; :`, newline, space) summarise the segments they close. When the cache
hits its cap (`budget`), the middle — everything between the first `sink_tokens` and the last
`window` tokens — is squeezed to its separators (the most recent `separators` of them), and the
cache grows again up to the cap. Reference values: a=4, s=64..128, w=256, cap 512.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from thinfer.compression.config import CompressionConfig
from thinfer.compression.policies import CompressionPolicy

if TYPE_CHECKING:
    from thinfer.engine.kv_cache import KVCache
    from thinfer.engine.sequence import Sequence
    from thinfer.loading.tokenizer import Tokenizer

SEPARATOR_TEXTS = frozenset(".,?!;:")
_SEPARATORS_BY_TOKENIZER: dict[int, frozenset[int]] = {}


def separator_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids whose text is one separator mark (spaces around it allowed) or only whitespace."""
    key = id(tokenizer)
    if key not in _SEPARATORS_BY_TOKENIZER:
        found = set()
        for token_id in range(tokenizer.vocab_size):
            text = tokenizer.decode([token_id], skip_special_tokens=True)
            stripped = text.strip()
            if (text and not stripped) or stripped in SEPARATOR_TEXTS:
                found.add(token_id)
        _SEPARATORS_BY_TOKENIZER[key] = frozenset(found)
    return _SEPARATORS_BY_TOKENIZER[key]


class SepLLMPolicy(CompressionPolicy):
    """Per-sequence SepLLM state: the original position of every cached slot."""

    def __init__(self, config: CompressionConfig, separators: frozenset[int]) -> None:
        super().__init__(config)
        self.separators = separators
        self.positions: list[int] = []

    @property
    def recent(self) -> int:
        """w: the recent window (default: half the cap)."""
        assert self.config.budget is not None
        return self.config.window if self.config.window is not None else self.config.budget // 2

    @property
    def separator_budget(self) -> int:
        """s: separators kept from the middle (default: half of what sinks and window leave)."""
        assert self.config.budget is not None
        if self.config.separators is not None:
            return self.config.separators
        return max(0, (self.config.budget - self.config.sink_tokens - self.recent) // 2)

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        start = self.positions[-1] + 1 if self.positions else 0
        self.positions.extend(range(start, seq.num_computed_tokens))
        assert self.config.budget is not None and len(self.positions) == seq.kv_len
        kv_len = seq.kv_len
        if kv_len < self.config.budget:
            return None
        tokens = seq.all_token_ids
        is_separator = [tokens[p] in self.separators for p in self.positions]
        if self.config.trigger == "uniform":
            # score: sinks > separators > the rest; newer first within each class
            scores = torch.tensor(
                [2.0 * kv_len * s for s in is_separator], dtype=torch.float64
            ) + torch.arange(kv_len, dtype=torch.float64)
            scores[: self.config.sink_tokens] = 4.0 * kv_len
            keep = self._uniform_keep(kv_len, scores[: kv_len - self.config.recent_window])
        else:
            sinks = min(self.config.sink_tokens, kv_len)
            middle_end = max(sinks, kv_len - self.recent)
            middle = [i for i in range(sinks, middle_end) if is_separator[i]]
            middle = (
                middle[max(0, len(middle) - self.separator_budget) :]
                if self.separator_budget
                else []
            )
            keep = torch.tensor(
                list(range(sinks)) + middle + list(range(middle_end, kv_len)), dtype=torch.long
            )
        self.positions = [self.positions[i] for i in keep.tolist()]
        return keep
