"""What an attention backend needs to know about one step's batch.

The batch is flat: tokens of all scheduled sequences are concatenated. Sequences that decode
one token come first (`num_decodes` of them, one query row each); sequences that prefill a
chunk follow. Sequence i writes its new keys and values into KV slots `slot_mapping` and then
attends to the first `context_lens[i]` slots of its block table (its whole cache, new tokens
included), causally for its own new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return len(self.query_lens_list)

    @property
    def num_decode_tokens(self) -> int:
        """Query rows that belong to decoding sequences (they come first)."""
        return self.num_decodes
