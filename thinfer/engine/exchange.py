"""How the ranks of one engine agree on what each step decides.

A tensor-parallel engine runs the same step on every rank (`thinfer.distributed`): the same
scheduler decisions, the same forward pass over each rank's shard. What must not be decided
independently goes through a `StepExchange`: the sampled tokens (the sampler runs on the
driver, rank 0, and its choices are sent to the others), the slots kept by a shared-selection
compression method (decided on the driver), the attention a shared method scores (summed
over the ranks' heads), and counts every rank must agree on (the number of KV blocks, the
length a per-head method compacts to). This base class is the single-process engine: every
exchange is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from thinfer.engine.sampler import SampledToken
from thinfer.engine.scheduler import ScheduledSequence
from thinfer.engine.sequence import Sequence

Chosen = tuple[list[tuple[Sequence, SampledToken]], list[tuple[Sequence, str]]]
Keep = tuple[torch.Tensor, int] | None
T = TypeVar("T")


class StepExchange:
    """One process: it decides everything itself."""

    world_size = 1
    is_driver = True  # this rank samples and makes the shared compression decisions

    def check_batch(self, batch: list[ScheduledSequence]) -> None:
        """Raise RuntimeError unless this rank scheduled the driver's batch (every rank runs
        the same scheduler over the same requests; this catches any divergence before the
        forward pass)."""

    def choose_tokens(self, seqs: list[Sequence], choose: Callable[[], Chosen]) -> Chosen:
        """The tokens of the step's sampling rows `seqs`: `choose()` on the driver, received
        from it elsewhere."""
        return choose()

    def shared_keep(self, decide: Callable[[], Keep]) -> Keep:
        """The (keep mask, kept count) of a shared-selection method: every rank runs
        `decide()` (its scores may be summed over the ranks' heads), the driver's result is
        the one every rank keeps."""
        return decide()

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (each rank holding its own heads' part)."""
        return values

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' `value`s."""
        return value

    def check_same(self, value: int, what: str) -> None:
        """Raise RuntimeError unless every rank has the same `value` (`what` names it)."""
