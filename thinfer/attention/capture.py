"""Attention signals that some compression policies need, collected during a forward pass.

H2O needs, per KV head, the attention probability every cached key received from this
step's queries (column sums); SnapKV and R-KV need the most recent rotated queries of each
layer; DynTS labels need column sums over only the answer's queries, without each query's
attention to itself. All are by-products of attention that a step computes anyway, so they
are taken from it instead of materialising full attention matrices later. A step without
such sequences carries no capture and pays nothing.
"""

from __future__ import annotations

import torch


class AttentionCapture:
    """What to keep from one step's attention, and what was kept (one entry per layer).

    Layers run in order, so the i-th tensor recorded for a sequence belongs to layer i.
    Column sums count every query of the step unless `column_sum_from` names, for a batch
    index, the first query slot that counts (the query written to cache slot s counts when
    s >= that slot; slots are absolute positions while nothing was evicted). With
    `exclude_self`, the probability a query gives its own key is left out of the sums.
    """

    def __init__(
        self,
        query_rows: dict[int, tuple[int, int]],
        column_sum_seqs: set[int],
        column_sum_from: dict[int, int] | None = None,
        exclude_self: bool = False,
    ) -> None:
        self.query_rows = query_rows  # batch index -> [start, end) rows of the flat batch
        self.column_sum_seqs = column_sum_seqs  # batch indices whose column sums are wanted
        self.column_sum_from = column_sum_from or {}  # batch index -> first query slot counted
        self.exclude_self = exclude_self
        self._queries: dict[int, list[torch.Tensor]] = {i: [] for i in query_rows}
        self._column_sums: dict[int, list[torch.Tensor]] = {i: [] for i in column_sum_seqs}

    def record_queries(self, q: torch.Tensor) -> None:
        """Keep the wanted rows of one layer's rotated queries q [T, Hq, D]."""
        for index, (start, end) in self.query_rows.items():
            self._queries[index].append(q[start:end].clone())

    def wants_column_sums(self, index: int) -> bool:
        """True when batch entry `index` needs the column sums of its attention."""
        return index in self.column_sum_seqs

    @property
    def wants_any_column_sums(self) -> bool:
        """True when some batch entry of the step needs its column sums."""
        return bool(self.column_sum_seqs)

    def first_counted_slot(self, index: int) -> int:
        """The first query slot of batch entry `index` whose attention enters its column
        sums (0: all of them)."""
        return self.column_sum_from.get(index, 0)

    def add_column_sums(self, index: int, sums: torch.Tensor) -> None:
        """Record one layer's column sums [Hkv, context] for batch entry `index` (float32, or
        the float64 fixed-point sums of the deterministic mode, kept exact)."""
        self._column_sums[index].append(sums if sums.dtype == torch.float64 else sums.float())

    def queries(self, index: int) -> torch.Tensor | None:
        """Recorded queries [layers, t, Hq, D] of batch entry `index`, or None."""
        recorded = self._queries.get(index)
        return torch.stack(recorded) if recorded else None

    def column_sums(self, index: int) -> torch.Tensor | None:
        """Recorded column sums [layers, Hkv, context] of batch entry `index`, or None."""
        recorded = self._column_sums.get(index)
        return torch.stack(recorded) if recorded else None


def sum_query_groups(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum attention probabilities [Hq, ..., S] over the query heads of each KV head
    -> [Hkv, ..., S] (GQA: query heads h*G .. h*G+G-1 share KV head h)."""
    group = probs.shape[0] // num_kv_heads
    return probs.view(num_kv_heads, group, *probs.shape[1:]).sum(1)
