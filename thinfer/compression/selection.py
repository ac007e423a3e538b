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

from thinfer.compression.compaction import keep_indices
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
) -> tuple[torch.Tensor, int] | None:
    """(keep mask [..., kv_len] in slot order, kept count), or None while the schedule waits.

    `layer_keys(layer)` returns a layer's cached keys in slot order [kv_len, kv_heads, D]
    (methods that declare `Signals.keys`); `queries` are the recent queries they declared.
    """
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
        scores = _shared(config, config.params.score(context(None, 0)))
        keep = keep_mask(scores, state.positions, state.protected, num_recent, count)
        return keep, view.kv_len - _num_evicted(keep)
    order = torch.sort(state.positions, dim=-1, stable=True).indices
    ctx = context(order, num_recent)
    if ctx.num_old:
        scores = _shared(config, config.params.score(ctx))
    else:
        scores = order.new_zeros(0).float()
    if scores.dim() < order.dim():
        scores = scores.expand(*order.shape[:-1], -1)
    protected = state.protected.gather(-1, order)[..., : ctx.num_old]
    scores = scores.masked_fill(protected, float("inf"))
    kept = order.gather(-1, keep_indices(scores, count, view.kv_len))
    keep = torch.zeros_like(state.protected).scatter_(-1, kept, True)
    return keep, kept.shape[-1]


def _shared(config: CompressionConfig, scores: torch.Tensor) -> torch.Tensor:
    """Per-head scores under shared scoring: one score per token, the mean over layers and
    heads."""
    if scores.dim() == 3 and not config.per_head:
        return scores.mean(dim=(0, 1))
    return scores


def _num_evicted(keep: torch.Tensor) -> int:
    return int((~keep[(0,) * (keep.dim() - 1)]).sum())


def keep_mask(
    scores: torch.Tensor,
    positions: torch.Tensor,
    protected: torch.Tensor,
    num_recent: int,
    count: int,
) -> torch.Tensor:
    """The keep rule of `keep_indices`, in slot order and O(slots): keep mask [..., n].

    The `num_recent` newest tokens (by position) are kept; of the others, the `count` best
    by score (at least every +inf one, never a -inf one); ties go to the older token. It
    evicts the k lowest instead of sorting: the k-th smallest score is a threshold, and among
    slots scoring exactly that, the newest are evicted first.
    """
    newest = positions.amax(dim=-1, keepdim=True)
    recent = positions > newest - num_recent
    old = ~recent
    inf = float("inf")
    key = scores.masked_fill(protected & old, inf).masked_fill(recent, inf)
    num_old = int(old[(0,) * (old.dim() - 1)].sum())
    keepable = int(((key > -inf) & old).sum(dim=-1).min())
    forced = int((torch.isposinf(key) & old).sum(dim=-1).max())
    evict = num_old - min(max(min(count, keepable), forced), num_old)
    if evict <= 0:
        return torch.ones_like(old)
    threshold = torch.kthvalue(key.float(), evict, dim=-1, keepdim=True).values
    below = key < threshold
    need = evict - below.sum(dim=-1, keepdim=True)  # >= 1: taken from the ties
    tied = key == threshold
    most = int(need.max())
    newest_tied = torch.topk(torch.where(tied, positions, -1), most, dim=-1).indices
    chosen = torch.arange(most, device=key.device) < need
    picked = torch.zeros_like(tied).scatter_(-1, newest_tied, chosen)
    return ~(below | (picked & tied))


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
