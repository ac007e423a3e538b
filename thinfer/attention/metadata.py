"""What an attention backend needs to know about one step's batch.

The batch is flat: tokens of all scheduled sequences are concatenated. Sequences that decode
one token come first (`num_decodes` of them, one query row each); sequences that prefill a
chunk follow. Sequence i writes its new keys and values into KV slots `slot_mapping` and then
attends to the first `context_lens[i]` slots of its block table (its whole cache, new tokens
included), causally for its own new tokens.

The metadata holds only what every backend needs. A backend that derives something per step
from it (the torch backend's decode length groups, the triton backend's device-side prefill
layout) builds it through `plan`, once per step, on the first layer's call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch

from thinfer.attention.capture import AttentionCapture

Plan = TypeVar("Plan")


@dataclass
class AttentionMetadata:
    """Flat-batch layout of one step, shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int64: KV length after this step's writes
    context_lens_list: list[int]
    query_lens_list: list[int]
    query_starts_list: list[int]
    num_decodes: int
    block_size: int
    capture: AttentionCapture | None = None  # signals for compression policies, if any
    _plans: dict[Callable[..., object], object] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return len(self.query_lens_list)

    def plan(self, build: Callable[[AttentionMetadata], Plan]) -> Plan:
        """`build(self)`, computed on the first call of the step and cached for every later
        layer. The cache is keyed by `build` itself, so a backend's plan is private to the
        module that defines its builder. A plan may read anything in the metadata, so metadata
        that is refilled in place and reused across steps (`thinfer.engine.decode_graphs`)
        must only reach code paths that build no plan.
        """
        if build not in self._plans:
            self._plans[build] = build(self)
        return cast(Plan, self._plans[build])
