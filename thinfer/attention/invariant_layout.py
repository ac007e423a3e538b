"""One step's layout for the batch-invariant attention (`invariant_paged`): which rows go in
which call, and where their padded keys sit in the paged cache, built once per step.

Everything here depends on the batch's block tables and lengths only, never on the layer,
so it is built on the first layer's call (`AttentionMetadata.plan`) and reused by the
others. Built per layer, the small index tensors it holds cost a host-to-device copy each,
and on CUDA every such copy waits for the layers queued before it: five per layer made a
Llama-2-7B decode step wait some 160 times.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinfer.attention.metadata import AttentionMetadata

KEY_SPLIT = 128  # keys are padded to a multiple of this per row (the fixed split size)


def padded_length(context: int) -> int:
    """Lp: `context` rounded up to a multiple of KEY_SPLIT."""
    return -(-context // KEY_SPLIT) * KEY_SPLIT


@dataclass(frozen=True)
class PaddedGather:
    """The first contexts[b] slots of B sequences, padded to a common `width` (a multiple of
    KEY_SPLIT): the cache blocks to read and the slots past each context to zero."""

    block_ids: torch.Tensor  # [B * num_blocks] cache blocks, sequence after sequence
    batch: int
    num_blocks: int
    width: int
    stale: torch.Tensor  # [B, width] bool: slot >= contexts[b]

    @classmethod
    def build(cls, tables: torch.Tensor, contexts: list[int], block_size: int) -> PaddedGather:
        """For block tables [B, n] (of `block_size`-slot blocks) and B context lengths."""
        width = padded_length(max(contexts))
        num_blocks = -(-width // block_size)
        if tables.shape[1] < num_blocks:  # the rest only pads, and is zeroed by `stale`
            tables = F.pad(tables, (0, num_blocks - tables.shape[1]))
        lens = torch.tensor(contexts, device=tables.device)
        stale = torch.arange(width, device=tables.device)[None, :] >= lens[:, None]
        block_ids = tables[:, :num_blocks].reshape(-1)
        return cls(block_ids, tables.shape[0], num_blocks, width, stale)

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """cache [blocks, block_size, Hkv, D] -> [Hkv, B, width, D], zero past each context:
        a fresh contiguous tensor."""
        block_size, num_kv_heads, head_dim = cache.shape[1], cache.shape[2], cache.shape[3]
        blocks = cache.index_select(0, self.block_ids)
        slots = blocks.view(self.batch, self.num_blocks * block_size, num_kv_heads, head_dim)
        padded = slots[:, : self.width].permute(2, 0, 1, 3).contiguous()
        return padded.masked_fill_(self.stale[None, :, :, None], 0)


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's chunk of `count` > 1 query rows from flat row `start`."""

    index: int
    start: int
    count: int
    context: int
    keys: PaddedGather
    first_counted: int | None


@dataclass(frozen=True)
class SingleRows:
    """Sequences with one query row each and the same padded length, attended in one call."""

    seqs: list[int]
    contexts: list[int]
    keys: PaddedGather
    starts: torch.Tensor  # [B] flat query row of each
    lens: torch.Tensor  # [B] context lengths
    counted: torch.Tensor | None  # [B] bool: column sums wanted from this row
    first_counted: list[int | None]


@dataclass(frozen=True)
class StepLayout:
    """The step's prefill chunks and groups of single rows, and whether column sums leave
    out each query's own key."""

    chunks: list[PrefillChunk]
    singles: list[SingleRows]
    exclude_self: bool


def step_layout(meta: AttentionMetadata) -> StepLayout:
    """Build the layout of `meta`'s step (through `meta.plan`: once per step)."""
    capture = meta.capture
    first_counted: list[int | None] = [
        capture.first_counted_slot(i) if capture and capture.wants_column_sums(i) else None
        for i in range(meta.num_seqs)
    ]
    chunks: list[PrefillChunk] = []
    by_width: dict[int, list[int]] = defaultdict(list)
    for i in range(meta.num_seqs):
        start, count = meta.query_starts_list[i], meta.query_lens_list[i]
        context = meta.context_lens_list[i]
        if count == 1:
            by_width[padded_length(context)].append(i)
            continue
        keys = PaddedGather.build(meta.block_tables[i : i + 1], [context], meta.block_size)
        chunks.append(PrefillChunk(i, start, count, context, keys, first_counted[i]))
    singles = []
    device = meta.block_tables.device
    for seqs in by_width.values():
        contexts = [meta.context_lens_list[i] for i in seqs]
        tables = meta.block_tables[torch.tensor(seqs, device=device)]
        wanted = [first_counted[i] for i in seqs]
        counted = None
        if any(first is not None for first in wanted):
            flags = [f is not None and n - 1 >= f for f, n in zip(wanted, contexts, strict=True)]
            counted = torch.tensor(flags, device=device)
        singles.append(
            SingleRows(
                seqs,
                contexts,
                PaddedGather.build(tables, contexts, meta.block_size),
                torch.tensor([meta.query_starts_list[i] for i in seqs], device=device),
                torch.tensor(contexts, device=device),
                counted,
                wanted,
            )
        )
    return StepLayout(chunks, singles, bool(capture and capture.exclude_self))
