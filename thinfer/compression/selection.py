"""Which slots a sequence keeps now: its schedule, its method's scores, the keep rule.

Pure tensors in, a keep mask out: the engine's compression stage calls `select_slots`, and
tests call it on hand-made states. Scoring happens in position order (the j-th oldest cached
token first), whatever the physical slots; the mask comes back in slot order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from thinfer.compression.compaction import keep_mask
from thinfer.compression.config import CompressionConfig
from thinfer.compression.method import RuleContext, ScoreContext
from thinfer.compression.schedule import decide
from thinfer.compression.slot_state import SlotState


@dataclass(frozen=True)
class SequenceView:
    """What selection needs to know about a sequence besides its slot state."""

    kv_len: int
    num_generated: int
    prompt_len: int
    all_token_ids: Callable[[], list[int]]  # prompt + output (called only when needed)


def select_slots(
    config: CompressionConfig,
    state: SlotState,
    view: SequenceView,
    *,
    resources: Any = None,
    layer_keys: Callable[[int], torch.Tensor] | None = None,
    queries: torch.Tensor | None = None,
    num_layers: int = 0,
    head_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int] | None:
    """(keep mask [..., kv_len] in slot order, kept count), or None while the schedule waits.

    `layer_keys(layer)` returns a layer's cached keys in slot order [kv_len, kv_heads, D]
    (methods that declare `Signals.keys`); `queries` are the recent queries they declared.
    `head_mean` turns per-head scores [layers, kv_heads, n] into the one score per token of
    shared scoring (default: their mean; under tensor parallelism, the mean over every
    rank's heads).
    """
    mean = head_mean or (lambda scores: scores.mean(dim=(0, 1)))
    rule = decide(config, RuleContext(view.kv_len, view.num_generated, view.prompt_len))
    if rule is None:
        return None
    num_recent, count = rule

    def context(order: torch.Tensor | None, recent: int) -> ScoreContext:
        """The scoring view: in position order (`order` sorts the slots), or in slot order."""

        def arrange(values: torch.Tensor) -> torch.Tensor:
            return values if order is None else values.gather(-1, order)

        keys = layer_keys
        if keys is not None and order is not None:
            keys = _ordered_keys(keys, order)
        return ScoreContext(
            kv_len=view.kv_len,
            num_recent=recent,
            num_generated=view.num_generated,
            prompt_len=view.prompt_len,
            positions=arrange(state.positions),
            values={name: arrange(state.value(name)) for name in state.value_names},
            token_ids=lambda at: torch.tensor(view.all_token_ids(), device=at.device)[at],
            keys=keys,
            queries=queries,
            num_layers=num_layers,
            resources=resources,
            uniform=config.trigger == "uniform",
        )

    if config.params.pointwise:  # score every slot where it lies: no reordering, O(slots)
        scores = _shared(config, config.params.score(context(None, 0)), mean)
        keep = keep_mask(scores, state.positions, state.protected, num_recent, count)
        return keep, view.kv_len - _num_evicted(keep)
    # Methods that look at neighbours (pooling, causal windows) score in position order; the
    # same keep rule then runs there, and its mask is scattered back to slot order.
    order = torch.sort(state.positions, dim=-1, stable=True).indices
    ctx = context(order, num_recent)
    scores = (
        _shared(config, config.params.score(ctx), mean) if ctx.num_old else ctx.positions.float()
    )
    scores = scores.expand(*order.shape[:-1], -1)  # [..., num_old]; shared scores broadcast
    recent = scores.new_zeros(*order.shape[:-1], num_recent)  # never evicted by the rule
    ordered = keep_mask(
        torch.cat([scores[..., : ctx.num_old], recent], dim=-1),
        ctx.positions,
        state.protected.gather(-1, order),
        num_recent,
        count,
    )
    keep = torch.zeros_like(ordered).scatter_(-1, order, ordered)
    return keep, view.kv_len - _num_evicted(keep)


def _shared(
    config: CompressionConfig,
    scores: torch.Tensor,
    head_mean: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per-head scores under shared scoring: one score per token, the mean over layers and
    heads."""
    if scores.dim() == 3 and not config.per_head:
        return head_mean(scores)
    return scores


def _num_evicted(keep: torch.Tensor) -> int:
    return int((~keep[(0,) * (keep.dim() - 1)]).sum())


def _ordered_keys(
    layer_keys: Callable[[int], torch.Tensor], order: torch.Tensor
) -> Callable[[int], torch.Tensor]:
    """A layer's keys in position order (per KV head for a per-head order [L, Hkv, n])."""

    def keys(layer: int) -> torch.Tensor:
        cached = layer_keys(layer)  # [n, Hkv, D]
        if order.dim() == 1:
            return cached.index_select(0, order)
        index = order[layer].t()[..., None].expand(-1, -1, cached.shape[-1])
        return cached.gather(0, index)

    return keys
