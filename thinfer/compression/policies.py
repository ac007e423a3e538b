"""Compression policies: given a sequence's cached slots, which ones to keep.

A policy only chooses slot indices; `KVCache.compact` moves the data and frees blocks.
`select` is called after a token was sampled and before it is written to the cache, with
`kv_len` slots cached; slots are in original token order (compaction preserves order), so
position-based methods can work on slot indices directly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from thinfer.compression.config import PER_HEAD_METHODS, CompressionConfig

if TYPE_CHECKING:
    from thinfer.engine.kv_cache import KVCache
    from thinfer.engine.sequence import Sequence
    from thinfer.loading.tokenizer import Tokenizer
    from thinfer.models.rope import RotaryEmbedding


class CompressionPolicy:
    """Base policy: keep everything (the full cache)."""

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    needs_hidden_states = False  # DynTS: `observe` gets each sampled row's final hidden state
    needs_attention_sums = False  # H2O: `observe_attention` gets attention column sums
    query_window = 0  # SnapKV, R-KV: `observe_attention` gets the last this-many queries

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        """Slot indices to keep, or None to keep all `seq.kv_len` slots.

        Shape [n] (ascending; shared by all layers and heads) or [layers, kv_heads, n]
        (per-head methods). `cache` gives methods that score keys access to them.
        """
        return None

    def observe(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """See the final hidden state [hidden] of the token `seq` just fed (if needed)."""

    def prepare(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Load and check what the policy needs from the model's side (before admission, so
        a bad file fails its own request, never a running batch)."""

    def after_compact(self, seq: Sequence, cache: KVCache, rotary: RotaryEmbedding) -> None:
        """Called after `cache.compact(seq, keep)` applied this policy's `select`."""

    def observe_attention(
        self, seq: Sequence, queries: torch.Tensor | None, column_sums: torch.Tensor | None
    ) -> None:
        """See this step's attention signals for `seq` (only those the policy asked for):
        rotated queries [layers, t, Hq, D] of its last t fed tokens, and the attention
        probability each of its `kv_len` slots received this step, [layers, Hkv, kv_len]."""

    def peak_slots(self, prompt_len: int, max_tokens: int) -> int:
        """The most KV slots a request can occupy under this policy.

        Prefill is never compressed; afterwards a bounded policy stays within its budget.
        """
        if self.config.method == "full" or self.config.budget is None:
            return prompt_len + max_tokens
        return min(prompt_len + max_tokens, max(prompt_len, self.config.budget))

    def _uniform_keep(self, kv_len: int, old_scores: torch.Tensor) -> torch.Tensor:
        """Uniform trigger: the W most recent slots plus the top floor(r*(L-W)) older ones."""
        window = min(self.config.recent_window, kv_len)
        num_old = kv_len - window
        top = math.floor(self.config.ratio * num_old)
        chosen = (
            torch.topk(old_scores, top).indices.sort().values
            if top
            else old_scores.new_empty(0, dtype=torch.long)
        )
        return torch.cat([chosen.long(), torch.arange(num_old, kv_len)])


class WindowPolicy(CompressionPolicy):
    """Window attention: the last `budget` tokens (new one included), every step once full."""

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        kv_len = seq.kv_len
        budget = self.config.budget
        assert budget is not None
        if kv_len < budget:
            return None
        if self.config.trigger == "uniform":
            return self._uniform_keep(
                kv_len, torch.arange(kv_len - self.config.recent_window).float()
            )
        return torch.arange(kv_len - budget + 1, kv_len)


_POLICIES: dict[str, type[CompressionPolicy]] = {
    "full": CompressionPolicy,
    "window": WindowPolicy,
}


def make_policy(
    config: CompressionConfig | None, tokenizer: Tokenizer | None = None
) -> CompressionPolicy:
    """A fresh policy object (policies keep per-sequence state) for a request's config.

    SepLLM finds its separator token ids in `tokenizer`.
    """
    config = config or CompressionConfig()
    if config.method == "streamingllm":
        from thinfer.compression.streamingllm import StreamingLLMPolicy

        return StreamingLLMPolicy(config)
    if config.method == "sepllm":
        from thinfer.compression.sepllm import SepLLMPolicy, separator_token_ids

        if tokenizer is None:
            raise ValueError("kv_compression: SepLLM needs a tokenizer to find separator tokens")
        return SepLLMPolicy(config, separator_token_ids(tokenizer))
    if config.method in PER_HEAD_METHODS:
        from thinfer.compression.per_head import H2OPolicy, RKVPolicy, SnapKVPolicy

        per_head = {"h2o": H2OPolicy, "snapkv": SnapKVPolicy, "rkv": RKVPolicy}
        return per_head[config.method](config)
    if config.method == "dynts":
        from thinfer.compression.dynts import DynTSPolicy  # imports the predictor module

        return DynTSPolicy(config)
    return _POLICIES[config.method](config)
