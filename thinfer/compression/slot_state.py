"""Per-slot state of one compressed sequence, aligned with its physical cache slots.

Every method's per-slot data lives here, in one place that compaction re-aligns once: the
original token position of each slot, whether the slot is protected (never evicted), and the
float values a method accumulates (H2O's attention received, DynTS's predicted importance).
Arrays have shape [capacity] for shared selection or [layers, kv_heads, capacity] for per-head
selection; the first `length` entries are live (`length == seq.kv_len`). Appends write in
place into spare capacity (doubling when full), so a decode step costs O(1), not O(kv_len).
"""

from __future__ import annotations

import torch

from thinfer.compression.compaction import CompactionPlan


class SlotState:
    """Positions, protection flags and named float values of a sequence's cached slots."""

    def __init__(
        self,
        prefix: tuple[int, ...],
        value_names: tuple[str, ...],
        device: torch.device,
        value_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.prefix = prefix
        self.length = 0
        self._positions = torch.empty(*prefix, 0, dtype=torch.long, device=device)
        self._protected = torch.empty(*prefix, 0, dtype=torch.bool, device=device)
        self._values = {
            name: torch.empty(*prefix, 0, dtype=value_dtype, device=device) for name in value_names
        }

    @property
    def positions(self) -> torch.Tensor:
        """Original token position of each live slot: [..., length]."""
        return self._positions[..., : self.length]

    @property
    def protected(self) -> torch.Tensor:
        """True for live slots that are never evicted: [..., length]."""
        return self._protected[..., : self.length]

    def value(self, name: str) -> torch.Tensor:
        """Live entries of value `name` (a view: writes go to the state): [..., length]."""
        return self._values[name][..., : self.length]

    @property
    def value_names(self) -> tuple[str, ...]:
        """Names of the float values kept per slot."""
        return tuple(self._values)

    def append(self, positions: torch.Tensor, protected: torch.Tensor) -> None:
        """Add slots for tokens at `positions` [m] (broadcast over the prefix), values 0."""
        count = positions.shape[-1]
        self._reserve(self.length + count)
        end = self.length + count
        self._positions[..., self.length : end] = positions
        self._protected[..., self.length : end] = protected
        for values in self._values.values():
            values[..., self.length : end] = 0.0
        self.length = end

    def append_range(
        self, first: int, count: int, protect_below: int, protect_from: int | None
    ) -> None:
        """Add slots for the tokens at positions first .. first + count - 1, protected below
        `protect_below` and from `protect_from` on (None: no such bound), values 0. One slot
        (a decode step) is written from Python values, without small tensors."""
        if count != 1:
            positions = torch.arange(first, first + count, device=self._positions.device)
            protected = positions < protect_below
            if protect_from is not None:
                protected |= positions >= protect_from
            self.append(positions, protected)
            return
        self._reserve(self.length + 1)
        index = self.length
        self._positions[..., index] = first
        self._protected[..., index] = first < protect_below or (
            protect_from is not None and first >= protect_from
        )
        for values in self._values.values():
            values[..., index] = 0.0
        self.length = index + 1

    def protect(self, from_position: int) -> None:
        """Protect every live slot whose token position is >= `from_position`."""
        self.protected.logical_or_(self.positions >= from_position)

    def apply(self, plan: CompactionPlan) -> None:
        """Re-align with the cache after `KVCache.compact(seq, plan)` (the same moves)."""
        for array in (self._positions, self._protected, *self._values.values()):
            plan.apply_to(array)
        self.length = plan.new_len

    def _reserve(self, needed: int) -> None:
        capacity = self._positions.shape[-1]
        if needed <= capacity:
            return
        grown = max(needed, 2 * capacity, 16)

        def grow(array: torch.Tensor) -> torch.Tensor:
            bigger = array.new_empty(*self.prefix, grown)
            bigger[..., : self.length] = array[..., : self.length]
            return bigger

        self._positions = grow(self._positions)
        self._protected = grow(self._protected)
        self._values = {name: grow(values) for name, values in self._values.items()}
