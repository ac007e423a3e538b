"""Schedules: when a sequence compresses, and how many slots it keeps.

Both schedules end in the same keep rule (`thinfer.compression.compaction.keep_mask`):
keep the `recent` newest slots and the best `older` of the rest by the method's score.

- "native": each method's own trigger and interval (`Method.native_rule`): every step once
  full for Window, StreamingLLM and H2O, at the cap for SepLLM, every `interval` generated
  tokens once the cache holds `budget` for SnapKV and R-KV, at the budget for DynTS.
- "uniform": for every method, when the cache holds `budget` slots keep the W most recent
  plus the top floor(ratio * (L - W)) older ones: the DynTS paper's rule, so methods can be
  compared at equal memory.
"""

from __future__ import annotations

import math

from thinfer.compression.config import CompressionConfig
from thinfer.compression.method import RuleContext


def decide(config: CompressionConfig, ctx: RuleContext) -> tuple[int, int] | None:
    """(recent, older) slots to keep now under `config`'s schedule, or None to wait."""
    if config.method == "full":
        return None
    if config.trigger == "native":
        return config.params.native_rule(config, ctx)
    assert config.budget is not None
    return uniform_rule(ctx.kv_len, config.budget, config.recent_window, config.ratio)


def uniform_rule(kv_len: int, budget: int, window: int, ratio: float) -> tuple[int, int] | None:
    """The uniform schedule's (recent, older) slots to keep for a cache of `kv_len` slots, or
    None below `budget`."""
    if kv_len < budget:
        return None
    window = min(window, kv_len)
    return window, math.floor(ratio * (kv_len - window))
