"""Per-head methods: H2O, SnapKV and R-KV keep a separate set of slots in every layer and KV
head, the same number everywhere (so the cache stays rectangular).

- H2O: per head, the heavy hitters (most accumulated attention received from every query so
  far) plus the recent window; every step once the cache is full.
- SnapKV (decode variant): per KV head, the slots the last `observation_window` queries attend
  to most (averaged over the window and the head's query group, max-pooled) plus the window;
  every `interval` generated tokens once the cache holds `budget` slots.
- R-KV: like SnapKV with R-KV's score (importance minus key redundancy).

Native triggers compress to `budget - 1` slots, so the cache holds `budget` once the new token
is written: H2O stays <= B, SnapKV and R-KV <= B + interval - 1. The uniform trigger keeps
`window` recent plus floor(ratio * (L - window)) older slots, chosen by the same scores.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from thinfer.compression.config import CompressionConfig
from thinfer.compression.head_scores import keep_per_head, rkv_scores, snapkv_scores
from thinfer.compression.policies import CompressionPolicy

if TYPE_CHECKING:
    from thinfer.engine.kv_cache import KVCache
    from thinfer.engine.sequence import Sequence


class H2OPolicy(CompressionPolicy):
    """Heavy-hitter oracle: accumulated attention per (layer, KV head, slot)."""

    needs_attention_sums = True

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.scores: torch.Tensor | None = None  # [layers, Hkv, kv_len], aligned with slots

    def observe_attention(
        self, seq: Sequence, queries: torch.Tensor | None, column_sums: torch.Tensor | None
    ) -> None:
        assert column_sums is not None and column_sums.shape[-1] == seq.kv_len
        if self.scores is None:
            self.scores = column_sums.clone()
            return
        grown = column_sums.clone()
        grown[..., : self.scores.shape[-1]] += self.scores
        self.scores = grown

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        budget, kv_len = self.config.budget, seq.kv_len
        assert budget is not None
        if kv_len < budget:
            return None
        assert self.scores is not None and self.scores.shape[-1] == kv_len
        if self.config.trigger == "uniform":
            recent = min(self.config.recent_window, kv_len)
            count = math.floor(self.config.ratio * (kv_len - recent))
        else:
            recent = min(self.recent_tokens, budget - 1)
            count = budget - 1 - recent
        keep = keep_per_head(self.scores[..., : kv_len - recent], count, kv_len)
        self.scores = torch.gather(self.scores, -1, keep.to(self.scores.device))
        return keep

    @property
    def recent_tokens(self) -> int:
        """N, the recent window of the native trigger (default half the budget)."""
        assert self.config.budget is not None
        return self.config.window if self.config.window is not None else self.config.budget // 2


class SnapKVPolicy(CompressionPolicy):
    """SnapKV at decode time: caches the last `observation_window` queries of every layer."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.query_window = config.observation_window
        self.queries: torch.Tensor | None = None  # [layers, <= w, Hq, D]

    def observe_attention(
        self, seq: Sequence, queries: torch.Tensor | None, column_sums: torch.Tensor | None
    ) -> None:
        assert queries is not None
        if self.queries is not None:
            queries = torch.cat([self.queries, queries], dim=1)
        self.queries = queries[:, -self.query_window :].clone()

    def peak_slots(self, prompt_len: int, max_tokens: int) -> int:
        if self.config.trigger == "uniform":
            return super().peak_slots(prompt_len, max_tokens)
        assert self.config.budget is not None
        bound = max(prompt_len, self.config.budget) + self.config.interval - 1
        return min(prompt_len + max_tokens, bound)

    def triggered(self, seq: Sequence) -> bool:
        """Compress now? Native: every `interval` generated tokens once the cache holds
        `budget` slots; uniform: whenever it holds `budget`."""
        assert self.config.budget is not None
        if seq.kv_len < self.config.budget:
            return False
        return (
            self.config.trigger == "uniform"
            or len(seq.output_token_ids) % self.config.interval == 0
        )

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        if not self.triggered(seq):
            return None
        if cache is None or self.queries is None:
            raise ValueError(f"{self.config.method} needs the KV cache and the recent queries")
        kv_len, budget = seq.kv_len, self.config.budget
        assert budget is not None
        if self.config.trigger == "uniform":
            recent = min(self.config.recent_window, kv_len)
            count = math.floor(self.config.ratio * (kv_len - recent))
        else:
            recent = min(self.query_window, kv_len)
            count = budget - 1 - recent
        keys = cache.sequence_keys(seq)  # [layers, kv_len, Hkv, D]
        queries = self.queries.to(keys.device)
        scores = torch.stack(
            [self.layer_scores(queries[i], keys[i], kv_len - recent) for i in range(len(keys))]
        )
        return keep_per_head(scores, count, kv_len)

    def layer_scores(self, queries: torch.Tensor, keys: torch.Tensor, num_old: int) -> torch.Tensor:
        """Scores [Hkv, num_old] of one layer's first `num_old` slots."""
        return snapkv_scores(queries, keys, num_old, self.config.pool_kernel)


class RKVPolicy(SnapKVPolicy):
    """R-KV: SnapKV's schedule and window with importance minus redundancy as the score."""

    def layer_scores(self, queries: torch.Tensor, keys: torch.Tensor, num_old: int) -> torch.Tensor:
        config = self.config
        return rkv_scores(
            queries,
            keys,
            num_old,
            config.pool_kernel,
            config.redundancy_lambda,
            config.redundancy_threshold,
        )
