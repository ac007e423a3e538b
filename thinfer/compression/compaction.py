"""Compaction by hole filling: an eviction of k slots moves at most k slots.

Attention does not depend on slot order (positions are absolute and applied before keys are
cached), so after choosing which slots to keep, the kept slots beyond the new length move into
the evicted slots below it; nothing else moves and the tail blocks are freed. Slots therefore
stop being in token order once anything was evicted; `SlotState.positions` says which token
each slot holds. Plans are rectangular: with per-head selection every layer and KV head keeps
the same number of slots, and rows that move fewer slots pad with moves of a slot onto itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompactionPlan:
    """Move slot `src[..., j]` to slot `dst[..., j]`, then keep the first `new_len` slots.

    `dst`/`src` have shape [m] (one plan for all layers and heads) or [layers, kv_heads, m].
    """

    new_len: int
    dst: torch.Tensor
    src: torch.Tensor

    @property
    def per_head(self) -> bool:
        """True when each layer and KV head moves its own slots."""
        return self.dst.dim() == 3

    def apply_to(self, array: torch.Tensor) -> None:
        """Apply the moves to a per-slot array [..., capacity] (same prefix as the plan, or
        any prefix for a shared plan)."""
        if self.dst.shape[-1] == 0:
            return
        if self.per_head:
            array.scatter_(-1, self.dst, array.gather(-1, self.src))
        else:
            array[..., self.dst] = array[..., self.src]


def plan_compaction(keep: torch.Tensor, new_len: int) -> CompactionPlan:
    """The hole-filling plan for a keep mask [..., n] with `new_len` True in every row.

    O(n) and no host sync: the j-th hole below `new_len` receives the j-th kept slot at or
    beyond it (both in slot order); rows with fewer holes than the widest pad with moves of
    their first kept slot onto itself.
    """
    n = keep.shape[-1]
    moves = min(n - new_len, new_len)
    if moves == 0:
        empty = torch.empty(*keep.shape[:-1], 0, dtype=torch.long, device=keep.device)
        return CompactionPlan(new_len, empty, empty)
    front, tail = keep[..., :new_len], keep[..., new_len:]
    first_kept = front.to(torch.int8).argmax(dim=-1, keepdim=True)  # a row with holes < moves
    dst = _ranked(~front, moves, first_kept)
    valid = torch.arange(moves, device=keep.device) < (~front).sum(dim=-1, keepdim=True)
    src = torch.where(valid, _ranked(tail, moves, first_kept) + new_len, dst)
    return CompactionPlan(new_len, dst, src)


def _ranked(mask: torch.Tensor, width: int, fill: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of each row, in order, in a [..., width] tensor padded
    with `fill` (rows have at most `width` True entries)."""
    rank = torch.where(mask, mask.long().cumsum(dim=-1) - 1, width)  # width: a dump column
    out = fill.expand(*mask.shape[:-1], width + 1).clone()
    index = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return out.scatter_(-1, rank, index)[..., :width]


def keep_mask(
    scores: torch.Tensor,
    positions: torch.Tensor,
    protected: torch.Tensor,
    num_recent: int,
    count: int,
) -> torch.Tensor:
    """The keep rule every schedule uses, in O(slots): keep mask [..., n], in the order given.

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
    exact = key if key.dtype == torch.float64 else key.float()  # float64 stays (deterministic)
    threshold = torch.kthvalue(exact, evict, dim=-1, keepdim=True).values
    below = key < threshold
    need = evict - below.sum(dim=-1, keepdim=True)  # >= 1: taken from the ties
    tied = key == threshold
    most = int(need.max())
    newest_tied = torch.topk(torch.where(tied, positions, -1), most, dim=-1).indices
    chosen = torch.arange(most, device=key.device) < need
    picked = torch.zeros_like(tied).scatter_(-1, newest_tied, chosen)
    return ~(below | (picked & tied))


def plan_in_order(keep: torch.Tensor, new_len: int) -> CompactionPlan:
    """Compaction that moves every kept slot to the front in slot order (what thinfer did
    before hole filling: O(kept) moves per eviction). Kept as the peer of
    `thinfer bench compaction`."""
    slots = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    src = slots[keep].view(*keep.shape[:-1], new_len)
    dst = torch.arange(new_len, device=keep.device).expand_as(src).contiguous()
    return CompactionPlan(new_len, dst, src)
