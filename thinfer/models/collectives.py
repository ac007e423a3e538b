"""The collective operations a tensor-parallel model needs, over torch.distributed.

`Collectives` itself is the single process: every operation is the identity. A model built
with `ProcessGroupCollectives` reduces the partial outputs of its row-parallel layers and
gathers the vocabulary shards of its logits across the ranks of a process group (gloo on
CPU, NCCL on GPUs). The group is a process-group object of its own, not torch's global
default group, so one process can hold several engines (`thinfer.distributed.groups`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Single process: nothing to reduce or gather."""

    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks (in place); returns it."""
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits [N, shard] of every rank -> [N, vocab_size] on every rank."""
        return logits


class ProcessGroupCollectives(Collectives):
    """The ranks of process group `group` (a `ProcessGroupGloo` or `ProcessGroupNCCL`)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world_size = group.size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks (in place); returns it."""
        self.group.allreduce([x]).wait()
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Logits [N, shard] of every rank -> [N, vocab_size] on every rank (the padding
        rows of the last shard are dropped)."""
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        self.group.allgather([parts], [logits]).wait()
        return torch.cat(parts, dim=-1)[..., :vocab_size]


SINGLE_PROCESS = Collectives()
