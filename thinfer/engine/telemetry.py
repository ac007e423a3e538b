"""Per-step telemetry: KV lengths, KV memory in use, attention FLOPs, time.

Benchmarks (decode curves) and server metrics read `LLMEngine.last_stats` after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

from thinfer.config import ModelConfig
from thinfer.engine.kv_cache import KVCache
from thinfer.engine.scheduler import ScheduledSequence


@dataclass
class StepStats:
    """What one engine step did."""

    step: int
    seconds: float
    num_tokens: int
    num_sampled: int
    kv_lens: dict[int, int]  # seq_id -> KV slots after the step (compaction included)
    kv_blocks_in_use: int
    kv_bytes_in_use: int
    attention_flops: int
    output_seconds: float = 0.0  # building the step's RequestOutputs (part of `seconds`)
    compression_seconds: float = 0.0  # selecting and compacting evicted slots (part of it)

    @property
    def tokens_per_second(self) -> float:
        """Tokens sampled per second in this step."""
        return self.num_sampled / self.seconds if self.seconds > 0 else 0.0


def attention_flops(
    model: ModelConfig, batch: list[ScheduledSequence], kv_before: list[int]
) -> int:
    """FLOPs of QK^T and PV over all layers for the step (2 per multiply-add, causal).

    A sequence with q new tokens and c slots after writing them attends q*c - q(q-1)/2 keys.
    """
    total = 0
    for item, before in zip(batch, kv_before, strict=True):
        queries = item.num_tokens
        context = before + queries
        total += queries * context - queries * (queries - 1) // 2
    per_key = 4 * model.num_attention_heads * model.head_dim * model.num_hidden_layers
    return total * per_key


def collect(
    step: int,
    seconds: float,
    batch: list[ScheduledSequence],
    kv_before: list[int],
    num_sampled: int,
    kv_cache: KVCache,
    model: ModelConfig,
    output_seconds: float = 0.0,
    compression_seconds: float = 0.0,
) -> StepStats:
    """Stats of a finished step (call after compaction so KV lengths are current)."""
    return StepStats(
        step=step,
        seconds=seconds,
        num_tokens=sum(item.num_tokens for item in batch),
        num_sampled=num_sampled,
        kv_lens={item.seq.seq_id: item.seq.kv_len for item in batch},
        kv_blocks_in_use=kv_cache.num_used_blocks,
        kv_bytes_in_use=kv_cache.num_used_blocks * kv_cache.bytes_per_block,
        attention_flops=attention_flops(model, batch, kv_before),
        output_seconds=output_seconds,
        compression_seconds=compression_seconds,
    )
