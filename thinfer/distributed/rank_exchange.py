"""`RankExchange`: the `StepExchange` of one rank of a tensor-parallel engine.

The driver (rank 0) decides and broadcasts; the workers receive. Tokens and keep masks go
as pickled objects over the gloo control group, attention sums over the device group.
Every rank makes the same exchanges in the same order, because every rank runs the same
step over the same scheduler state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from thinfer.distributed.groups import RankGroups
from thinfer.engine.exchange import Chosen, Keep, StepExchange
from thinfer.engine.scheduler import ScheduledSequence
from thinfer.engine.sequence import Sequence


class RankExchange(StepExchange):
    """Rank `groups.rank` of `groups.world_size`; tensors it receives go to `device`."""

    def __init__(self, groups: RankGroups, device: torch.device) -> None:
        self.groups = groups
        self.device = device
        self.world_size = groups.world_size
        self.is_driver = groups.rank == 0

    def check_batch(self, batch: list[ScheduledSequence]) -> None:
        """The driver sends its batch (sequence ids and token counts); workers compare."""
        own = [(item.seq.seq_id, item.num_tokens) for item in batch]
        driver = self.groups.broadcast_object(own if self.is_driver else None)
        if driver != own:
            raise RuntimeError(
                f"tensor-parallel rank {self.groups.rank} scheduled {own}, the driver {driver}"
            )

    def choose_tokens(self, seqs: list[Sequence], choose: Callable[[], Chosen]) -> Chosen:
        """The driver samples and sends (row, token) pairs; workers map rows to `seqs`."""
        if self.is_driver:
            chosen, failed = choose()
            row = {id(seq): i for i, seq in enumerate(seqs)}
            self.groups.broadcast_object(
                ([(row[id(s)], t) for s, t in chosen], [(row[id(s)], why) for s, why in failed])
            )
            return chosen, failed
        picked, broken = self.groups.broadcast_object()
        return [(seqs[i], t) for i, t in picked], [(seqs[i], why) for i, why in broken]

    def shared_keep(self, decide: Callable[[], Keep]) -> Keep:
        """Every rank decides (taking part in the score sums); the driver's decision (keep
        mask, kept count) is sent to every rank."""
        keep = decide()
        if self.is_driver:
            self.groups.broadcast_object(None if keep is None else (keep[0].cpu(), keep[1]))
            return keep
        received = self.groups.broadcast_object()
        return None if received is None else (received[0].to(self.device), received[1])

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks, on every rank."""
        values = values.contiguous()
        self.groups.device.allreduce([values]).wait()
        return values

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' `value`s."""
        return self.groups.reduce_ints([value], dist.ReduceOp.MIN)[0]

    def check_same(self, value: int, what: str) -> None:
        """RuntimeError unless every rank has the same `value`."""
        high, neg_low = self.groups.reduce_ints([value, -value], dist.ReduceOp.MAX)
        if high != -neg_low:
            raise RuntimeError(
                f"tensor-parallel ranks disagree on the {what}: from {-neg_low} to {high}"
            )
