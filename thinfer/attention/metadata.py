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

from thinfer.attention.capture import AttentionCapture


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
    decode_groups: list[tuple[int, int]]  # [start, end) slices of the decodes, see below
    capture: AttentionCapture | None = None  # signals for compression policies, if any
    # Device-side prefill layout (starts, lengths, longest), built once per step by the
    # triton backend's first layer and reused by the others.
    prefill_layout: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return len(self.query_lens_list)


# Cost of one more attention call per layer, in padded (sequence x slot) units: measured on
# the dev CPU, a call costs about as much as gathering and attending ~256 extra slots.
GROUP_OVERHEAD_SLOTS = 256
MAX_DECODE_GROUPS = 4


def plan_decode_groups(context_lens: list[int]) -> list[tuple[int, int]]:
    """Split decodes sorted by ascending context length into contiguous groups.

    Each group is padded to its longest member; a split is made where it saves more padded
    slots than `GROUP_OVERHEAD_SLOTS` (greedy, at most `MAX_DECODE_GROUPS` groups).
    """
    if not context_lens:
        return []
    groups = [(0, len(context_lens))]
    while len(groups) < MAX_DECODE_GROUPS:
        best_saving, best = GROUP_OVERHEAD_SLOTS, None
        for index, (start, end) in enumerate(groups):
            longest = context_lens[end - 1]
            for split in range(start + 1, end):
                saving = (split - start) * (longest - context_lens[split - 1])
                if saving > best_saving:
                    best_saving, best = saving, (index, split)
        if best is None:
            break
        index, split = best
        start, end = groups[index]
        groups[index : index + 1] = [(start, split), (split, end)]
    return groups
