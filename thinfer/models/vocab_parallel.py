"""The token embedding, split by vocabulary rows across tensor-parallel ranks.

Each rank looks up the ids of its own vocabulary shard, writes zeros for the others, and an
all-reduce sums the ranks' rows into the full embeddings (Megatron's VocabParallelEmbedding).
With one rank it is a plain lookup. The weight may be tied to `lm_head`, whose logits shards
are gathered by `Collectives.gather_vocab`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinfer.models.collectives import SINGLE_PROCESS, Collectives


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table; ids outside them embed to zero
    before the reduction over ranks."""

    def __init__(
        self,
        rows: int,
        hidden_size: int,
        start: int = 0,
        collectives: Collectives = SINGLE_PROCESS,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.start = start
        self.collectives = collectives

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> embeddings [..., hidden], identical on every rank."""
        if self.collectives.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.collectives.all_reduce(x)
