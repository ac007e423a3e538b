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
    order = torch.sort(state.positions, dim=-1, stable=True).indices
    context = ScoreContext(
        kv_len=view.kv_len,
        num_recent=num_recent,
        num_generated=view.num_generated,
        prompt_len=view.prompt_len,
        positions=state.positions.gather(-1, order),
        values={name: state.value(name).gather(-1, order) for name in state.value_names},
        token_ids=lambda positions: torch.tensor(view.all_token_ids(), device=positions.device)[
            positions
        ],
        keys=_ordered_keys(layer_keys, order) if layer_keys is not None else None,
        queries=queries,
        num_layers=num_layers,
        resources=resources,
        uniform=config.trigger == "uniform",
    )
    scores = config.params.score(context) if context.num_old else order.new_zeros(0).float()
    if scores.dim() == 3 and not config.per_head:
        scores = scores.mean(dim=(0, 1))  # shared scoring: one score per token
    if scores.dim() < order.dim():
        scores = scores.expand(*order.shape[:-1], -1)
    protected = state.protected.gather(-1, order)[..., : context.num_old]
    scores = scores.masked_fill(protected, float("inf"))
    kept = order.gather(-1, keep_indices(scores, count, view.kv_len))
    keep = torch.zeros_like(state.protected).scatter_(-1, kept, True)
    return keep, kept.shape[-1]


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
