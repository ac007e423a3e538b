"""StreamingLLM: the first `sink_tokens` attention sinks plus the most recent tokens.

Positions. By default every key keeps the rotation of its absolute position. With
`reassign_positions`, attention sees positions *within the cache* as StreamingLLM defines
them: sink i at position i, the token in slot j at position j, the new query at `kv_len`.
RoPE scores depend only on the distance between query and key, and the kept tail is
contiguous and ends at the query, so its absolute distances already equal the in-cache ones;
only the sinks are too far away. After each compaction the sinks are therefore re-rotated
forward by the number of evicted tokens, always from a pristine copy of their original keys
(taken once, so rounding never accumulates; a few tokens per layer). The query keeps its
absolute position, which validation bounds by the model's context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from thinfer.compression.config import CompressionConfig
from thinfer.compression.policies import WindowPolicy
from thinfer.models.rope import rotate

if TYPE_CHECKING:
    from thinfer.engine.kv_cache import KVCache
    from thinfer.engine.sequence import Sequence
    from thinfer.models.rope import RotaryEmbedding


class StreamingLLMPolicy(WindowPolicy):
    """Sinks + recent tokens, every step once full; optionally in-cache positions."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.num_sinks = config.sink_tokens  # sink slots currently cached (slots 0..n-1)
        self.sink_keys: torch.Tensor | None = None  # [layers, n, Hkv, D] at positions 0..n-1

    def select(self, seq: Sequence, cache: KVCache | None = None) -> torch.Tensor | None:
        kv_len, budget = seq.kv_len, self.config.budget
        assert budget is not None
        if kv_len < budget:
            return None
        if self.config.trigger == "uniform":
            scores = torch.arange(kv_len - self.config.recent_window).float()
            sinks = min(self.num_sinks, scores.numel())
            # sinks outrank every other slot, the earliest sink first
            scores[:sinks] = 2.0 * kv_len - torch.arange(sinks).float()
            keep = self._uniform_keep(kv_len, scores)
        else:
            recent = budget - 1 - self.config.sink_tokens
            keep = torch.cat([torch.arange(self.num_sinks), torch.arange(kv_len - recent, kv_len)])
        self.num_sinks = int((keep < self.num_sinks).sum())
        return keep

    def after_compact(self, seq: Sequence, cache: KVCache, rotary: RotaryEmbedding) -> None:
        """Re-rotate the sinks so their distance to the next query is the in-cache one."""
        if not self.config.reassign_positions or self.num_sinks == 0:
            return
        if self.sink_keys is None:  # first compaction: sinks still hold their original keys
            self.sink_keys = cache.sequence_keys(seq)[:, : self.num_sinks].clone()
        shift = seq.num_computed_tokens - seq.kv_len  # tokens evicted so far
        angles = rotary.angles(torch.tensor([shift], device=self.sink_keys.device))
        cache.write_keys(seq, 0, rotate(self.sink_keys[:, : self.num_sinks], angles))
